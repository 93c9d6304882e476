"""Conv unit: walks a conv or fc layer through the systolic array and post-processes the
results into the next layer's activations.

Feeder: the array's R rows take R output pixels at once (in the pooling-order walk of
firmware/layers.py); each reduction step k = (ki, kj, c) reads, per row, one input word
from that row's own copy of the activation buffer and picks lane c % C, zero where the
window leaves the image (padding) or the row has no pixel (the last tile); the weight
word of step k gives the C columns. Output: bias, round-half-up shift, saturation to
int8 (int16 for logits), ReLU, then the running max of every pooling window's
consecutive rows, one output word per (pooled) pixel and output group.

Ref: docs/numerics.md, "Frozen network"; sim.fixed_model.layer_forward.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from firmware.layers import ADDR_BITS, ConvDescriptor
from .layouts import conv_out_layout, feed_layout, result_layout

__all__ = ["ConvUnit"]

_Pixel = data.StructLayout({
    "ih0": signed(10), "iw0": signed(10),      # input row/column of the window's corner
    "addr": signed(ADDR_BITS + 1),             # in_base + its word offset (mod 2^16)
})


def _read_port(width):
    return In(memory.ReadPort.Signature(addr_width=ADDR_BITS, shape=unsigned(width)))


class ConvUnit(wiring.Component):
    """Drives the systolic array for one layer at a time.

    Members
    -------
    start, desc : In    a `firmware.layers.ConvDescriptor`, taken when start is high and
                        the unit is idle
    busy        : Out   from the cycle after start until the last output word is taken
    feed        : Out   stream to the array (`feed_layout`)
    result      : In    stream from the array (`result_layout`)
    act         : R read ports (one per array row) of the activation buffer copies
    weight, bias: read ports of the weight (C x int8) and bias (C x int32) memories
    o           : Out   stream of output words (`conv_out_layout`): address, C lanes
                        (int8 or int16 values), ``last`` on the layer's final word

    Timing: R cycles to line up the first tile's pixels, then one reduction step per
    cycle; a tile takes max(K, R) cycles, and tiles of a layer follow back to back.
    Results leave ~C + 10 cycles after their tile's last step (array latency, four
    post-processing stages: bias, shift, clamp, pool).
    """

    def __init__(self, rows, cols, acc_width=32):
        self._rows, self._cols, self._acc_width = rows, cols, acc_width
        super().__init__(self._members(rows, cols, acc_width))

    @staticmethod
    def _members(rows, cols, acc_width):
        members = {
            "start": In(1),
            "desc": In(ConvDescriptor),
            "busy": Out(1),
            "feed": Out(stream.Signature(feed_layout(rows, cols))),
            "result": In(stream.Signature(result_layout(cols, acc_width))),
            "weight": _read_port(8 * cols),
            "bias": _read_port(acc_width * cols),
            "o": Out(stream.Signature(conv_out_layout(cols, 16, ADDR_BITS))),
        }
        for r in range(rows):
            members[f"act{r}"] = _read_port(8 * cols)
        return members

    def elaborate(self, platform):
        m = Module()
        R, C = self._rows, self._cols
        d = Signal(ConvDescriptor)                  # the layer being run
        acts = [getattr(self, f"act{r}") for r in range(R)]

        # ------------------------------------------------------------------ control
        feeding = Signal()
        draining = Signal()
        finished = Signal()                         # the last output word and array row are taken
        m.d.comb += self.busy.eq(feeding | draining)
        begin = self.start & ~self.busy
        k_last, tile_last, group_last = Signal(16), Signal(12), Signal(8)
        c_last_in, kj_last = Signal(12), Signal(8)
        with m.If(begin):
            m.d.sync += [d.eq(self.desc), feeding.eq(1), draining.eq(1)]
            # the reduction loop's bounds less one, taken with the descriptor: its compares
            # then have no subtractor in front (one was the 25F's worst path)
            m.d.sync += [k_last.eq(self.desc.k_len - 1), tile_last.eq(self.desc.tiles - 1),
                         group_last.eq(self.desc.g_out - 1), c_last_in.eq(self.desc.cin - 1),
                         kj_last.eq(self.desc.kw - 1)]
        with m.If(finished):
            m.d.sync += draining.eq(0)

        # ------------------------------------------------- pixel walk (one per cycle)
        # the walk's counters count down to zero, so that which step comes next is
        # decided by zero tests, not by comparisons in series with the address adder
        st = Signal(_Pixel)
        dx_left, dy_left = Signal(2), Signal(2)     # pool_w - 1 - dx, pool_h - 1 - dy
        px_left = Signal(8)                         # wp - 1 - px
        slot_left = Signal(16)                      # tiles * R - 1 - slot
        chain = [Signal(_Pixel, name=f"nxt{r}") for r in range(R)]
        cur = [Signal(_Pixel, name=f"cur{r}") for r in range(R)]
        produced = Signal(range(R + 1))
        tile_start = Signal()                       # a tile's first step is issued

        produce = feeding & (produced < R)
        # in_base is folded into the walk's addresses, so that a read address is one sum
        # (pixel + step offset) after the pixel's mux
        def walk_start(desc):
            return [st.ih0.eq(-desc.pad_h), st.iw0.eq(-desc.pad_w),
                    st.addr.eq(desc.addr0 + desc.in_base),
                    dx_left.eq(desc.pool_w - 1), dy_left.eq(desc.pool_h - 1),
                    px_left.eq(desc.wp - 1), slot_left.eq(desc.tiles * R - 1)]

        with m.If(begin):
            m.d.sync += walk_start(self.desc)
            m.d.sync += produced.eq(0)
        with m.Elif(produce):
            m.d.sync += [chain[R - 1].eq(st), produced.eq(produced + 1)]
            m.d.sync += [chain[r].eq(chain[r + 1]) for r in range(R - 1)]
            kind = Signal(2)
            with m.If(dx_left != 0):
                m.d.comb += kind.eq(0)
                m.d.sync += dx_left.eq(dx_left - 1)
            with m.Elif(dy_left != 0):
                m.d.comb += kind.eq(1)
                m.d.sync += [dx_left.eq(d.pool_w - 1), dy_left.eq(dy_left - 1)]
            with m.Elif(px_left != 0):
                m.d.comb += kind.eq(2)
                m.d.sync += [dx_left.eq(d.pool_w - 1), dy_left.eq(d.pool_h - 1),
                             px_left.eq(px_left - 1)]
            with m.Else():
                m.d.comb += kind.eq(3)
                m.d.sync += [dx_left.eq(d.pool_w - 1), dy_left.eq(d.pool_h - 1),
                             px_left.eq(d.wp - 1)]
            with m.If(slot_left == 0):
                # the walk restarts for the next output group
                m.d.sync += walk_start(d)
            with m.Else():
                m.d.sync += [st.ih0.eq(st.ih0 + d.step_ih[kind]),
                             st.iw0.eq(st.iw0 + d.step_iw[kind]),
                             st.addr.eq(st.addr + d.step_addr[kind]),
                             slot_left.eq(slot_left - 1)]
        with m.If(tile_start):
            m.d.sync += [cur[r].eq(chain[r]) for r in range(R)]
            m.d.sync += produced.eq(0)

        # ------------------------------------------------------- reduction-step loop
        k = Signal(16)
        lane = Signal(range(C))
        c = Signal(12)
        ki, kj = Signal(8), Signal(8)
        koff = Signal(ADDR_BITS)                    # (ki * W + kj) * G
        kc = Signal(ADDR_BITS)                      # koff + c // C: the step's word offset
        first = Signal(init=1)                      # k == 0, registered
        tile, group = Signal(12), Signal(8)
        w_addr, w_group = Signal(ADDR_BITS), Signal(ADDR_BITS)

        # The beat's memory reads go through two stages, both moving when the feed does:
        # B, the block RAMs read the words; C, their registers hold them (the layer
        # engine's ports answer two `en` cycles after the address). C is on the feed.
        b_valid, c_valid = Signal(), Signal()
        b_mask, c_mask = Signal(R), Signal(R)
        b_lane, c_lane = Signal(range(C)), Signal(range(C))
        b_last, c_last = Signal(), Signal()
        advance = ~c_valid | self.feed.ready
        issue = feeding & advance & (~first | (produced == R))
        m.d.comb += tile_start.eq(issue & first)

        for r in range(R):
            pix = Signal(_Pixel, name=f"row{r}")
            m.d.comb += pix.eq(Mux(first, chain[r], cur[r]))
            ih, iw = Signal(signed(11), name=f"ih{r}"), Signal(signed(11), name=f"iw{r}")
            m.d.comb += [ih.eq(pix.ih0 + ki), iw.eq(pix.iw0 + kj)]
            inside = (ih >= 0) & (ih < d.in_h) & (iw >= 0) & (iw < d.in_w)
            m.d.comb += [acts[r].addr.eq(pix.addr + kc), acts[r].en.eq(advance)]
            with m.If(issue):
                m.d.sync += b_mask[r].eq(inside)
        m.d.comb += [self.weight.addr.eq(w_addr), self.weight.en.eq(advance)]

        with m.If(begin):
            m.d.sync += [k.eq(0), first.eq(1), lane.eq(0), c.eq(0), ki.eq(0), kj.eq(0),
                         koff.eq(0), kc.eq(0), tile.eq(0), group.eq(0), w_addr.eq(self.desc.w_base),
                         w_group.eq(self.desc.w_base), b_valid.eq(0), c_valid.eq(0)]
        with m.Elif(issue):
            m.d.sync += [b_lane.eq(lane), b_last.eq(k == k_last), first.eq(k == k_last)]
            with m.If(k == k_last):
                m.d.sync += [k.eq(0), lane.eq(0), c.eq(0), ki.eq(0), kj.eq(0), koff.eq(0),
                             kc.eq(0)]
                with m.If(tile == tile_last):
                    m.d.sync += [tile.eq(0), group.eq(group + 1),
                                 w_addr.eq(w_group + d.k_len), w_group.eq(w_group + d.k_len)]
                    with m.If(group == group_last):
                        m.d.sync += feeding.eq(0)
                with m.Else():
                    m.d.sync += [tile.eq(tile + 1), w_addr.eq(w_group)]
            with m.Else():
                m.d.sync += [k.eq(k + 1), w_addr.eq(w_addr + 1)]
                with m.If(c == c_last_in):
                    m.d.sync += [c.eq(0), lane.eq(0)]
                    with m.If(kj == kj_last):
                        m.d.sync += [kj.eq(0), ki.eq(ki + 1), koff.eq(koff + d.k_row_step),
                                     kc.eq(koff + d.k_row_step)]
                    with m.Else():
                        m.d.sync += [kj.eq(kj + 1), koff.eq(koff + d.g_in), kc.eq(koff + d.g_in)]
                with m.Else():
                    m.d.sync += c.eq(c + 1)
                    with m.If(lane == C - 1):
                        m.d.sync += [lane.eq(0), kc.eq(kc + 1)]
                    with m.Else():
                        m.d.sync += lane.eq(lane + 1)

        with m.If(~begin & advance):
            m.d.sync += [b_valid.eq(issue), c_valid.eq(b_valid), c_mask.eq(b_mask),
                         c_lane.eq(b_lane), c_last.eq(b_last)]

        m.d.comb += [self.feed.valid.eq(c_valid), self.feed.payload.last.eq(c_last)]
        for r in range(R):
            byte = acts[r].data.word_select(c_lane, 8).as_signed()
            m.d.comb += self.feed.payload.a[r].eq(Mux(c_mask[r], byte, 0))
        for j in range(C):
            m.d.comb += self.feed.payload.b[j].eq(self.weight.data.word_select(j, 8).as_signed())

        # ------------------------------------------------------------ output side
        o_slot = Signal(16)
        o_group = Signal(8)
        # the requantizer's rounding half is added to the bias, once per output group, so
        # that no stage holds two carry chains: (c + b + half) >> shift is unchanged
        half = Signal(32)
        m.d.comb += half.eq((Const(1, 33) << d.shift) >> 1)
        bias = Signal(data.ArrayLayout(signed(self._acc_width + 1), C))
        bias_state = Signal(2)                      # 0 read it, 1 reading, 2 rounding, 3 held
        with m.If(begin):
            m.d.sync += [o_slot.eq(0), o_group.eq(0), bias_state.eq(0)]
        with m.Elif(draining & (bias_state == 0)):
            m.d.sync += bias_state.eq(1)
        with m.Elif(bias_state == 1):
            m.d.sync += [bias[j].eq(self.bias.data.word_select(j, self._acc_width).as_signed())
                         for j in range(C)]
            m.d.sync += bias_state.eq(2)
        with m.Elif(bias_state == 2):
            m.d.sync += [bias[j].eq(bias[j] + half) for j in range(C)]
            m.d.sync += bias_state.eq(3)
        m.d.comb += [self.bias.addr.eq(d.b_base + o_group), self.bias.en.eq(bias_state == 0)]

        enable = ~self.o.valid | self.o.ready       # the whole pipeline moves together
        take = self.result.valid & enable & (bias_state == 3)
        m.d.comb += self.result.ready.eq(enable & (bias_state == 3))

        # the window's last phase, pool_h * pool_w - 1 (1, 2 or 4 rows: R is a multiple),
        # taken with the descriptor: shifts and an add, not a multiplier block on the path
        # into every result's stage 1
        pool_last = Signal(2)
        ph, pw = self.desc.pool_h, self.desc.pool_w
        with m.If(begin):
            m.d.sync += pool_last.eq(Mux(pw[0], ph, 0) + Mux(pw[1], ph << 1, 0) - 1)
        phase = Signal(2)
        out_addr, out_group = Signal(ADDR_BITS), Signal(ADDR_BITS)
        # stage 1: bias (and the rounding half)
        s1_valid, s1_emit, s1_first, s1_last = Signal(), Signal(), Signal(), Signal()
        s1_addr = Signal(ADDR_BITS)
        s1_sum = Signal(data.ArrayLayout(signed(self._acc_width + 2), C))
        # stage 2: shift; stage 3: clamp
        s2_valid, s2_emit, s2_first, s2_last = Signal(), Signal(), Signal(), Signal()
        s2_addr = Signal(ADDR_BITS)
        s2_sh = Signal(data.ArrayLayout(signed(self._acc_width + 2), C))
        s3_valid, s3_emit, s3_first, s3_last = Signal(), Signal(), Signal(), Signal()
        s3_addr = Signal(ADDR_BITS)
        s3_y = Signal(data.ArrayLayout(signed(16), C))
        pool_max = Signal(data.ArrayLayout(signed(16), C))

        with m.If(begin):
            m.d.sync += [phase.eq(0), out_addr.eq(self.desc.out_base),
                         out_group.eq(self.desc.out_base)]
        with m.If(enable):
            keep = take & (o_slot < d.m_pix)
            m.d.sync += [s1_valid.eq(keep), s1_emit.eq(phase == pool_last),
                         s1_first.eq(phase == 0), s1_addr.eq(out_addr),
                         s1_last.eq((o_group == d.g_out - 1) & (o_slot == d.m_pix - 1))]
            m.d.sync += [s1_sum[j].eq(self.result.payload.c[j] + bias[j]) for j in range(C)]
            with m.If(keep):
                with m.If(phase == pool_last):
                    m.d.sync += [phase.eq(0), out_addr.eq(out_addr + d.g_out)]
                with m.Else():
                    m.d.sync += phase.eq(phase + 1)
            with m.If(take):
                with m.If(o_slot == d.tiles * R - 1):
                    m.d.sync += [o_slot.eq(0), o_group.eq(o_group + 1), bias_state.eq(0),
                                 out_addr.eq(out_group + 1), out_group.eq(out_group + 1)]
                with m.Else():
                    m.d.sync += o_slot.eq(o_slot + 1)

            m.d.sync += [s2_valid.eq(s1_valid), s2_emit.eq(s1_emit), s2_first.eq(s1_first),
                         s2_last.eq(s1_last), s2_addr.eq(s1_addr)]
            m.d.sync += [s2_sh[j].eq(s1_sum[j] >> d.shift) for j in range(C)]
            m.d.sync += [s3_valid.eq(s2_valid), s3_emit.eq(s2_emit), s3_first.eq(s2_first),
                         s3_last.eq(s2_last), s3_addr.eq(s2_addr)]
            hi = Mux(d.wide, 32767, 127)
            lo = Mux(d.relu, 0, Mux(d.wide, -32768, -128))
            for j in range(C):
                m.d.sync += s3_y[j].eq(Mux(s2_sh[j] > hi, hi, Mux(s2_sh[j] < lo, lo, s2_sh[j])))

            # stage 4: running max of the window, one output word per window
            m.d.sync += self.o.valid.eq(s3_valid & s3_emit)
            with m.If(s3_valid):
                for j in range(C):
                    best = Mux(s3_first | (s3_y[j] > pool_max[j]), s3_y[j], pool_max[j])
                    m.d.sync += [pool_max[j].eq(best), self.o.payload.data[j].eq(best)]
                m.d.sync += [self.o.payload.addr.eq(s3_addr), self.o.payload.last.eq(s3_last)]

        # The last output word can leave before the array's last rows: a final tile with
        # fewer pixels than rows still sends R rows, which must not spill into the next
        # layer. The layer ends when both have happened, in either order.
        last_word = self.o.valid & self.o.ready & self.o.payload.last
        last_row = take & (o_group == d.g_out - 1) & (o_slot == d.tiles * R - 1)
        word_seen, row_seen = Signal(), Signal()
        with m.If(begin):
            m.d.sync += [word_seen.eq(0), row_seen.eq(0)]
        with m.Else():
            with m.If(last_word):
                m.d.sync += word_seen.eq(1)
            with m.If(last_row):
                m.d.sync += row_seen.eq(1)
        m.d.comb += finished.eq(draining & (word_seen | last_word) & (row_seen | last_row))
        return m
