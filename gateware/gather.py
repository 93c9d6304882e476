"""Gather unit: moves samples into the layer engine's activation buffer (MOVE) and the
adapter inputs and base logits out of it (GATHER), for the sequencer.

Ref: docs/isa.md, MOVE and GATHER; ``firmware.isa.gather_layout`` (where each layer's
input sits) and ``firmware.layers.pack_activations`` (the buffer's layout: channels-last,
each pixel padded to ``groups`` words of C int8 lanes). The 4-bit format is the cache's
(`gateware.cache.four_bit_code`), so that a sample reaches the adapters in the same
format whether it comes from the cache or from the frozen network.
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from firmware.isa import cache_setup_layout, gather_layout
from firmware.layers import ADDR_BITS

from .cache import four_bit_code
from .layer_engine import MEM_ACT, MEM_LOGIT, load_layout
from .layouts import class_bits, fill_layout, index_bits, sample_layout
from .segmented import SegmentedRAM

__all__ = ["GatherUnit", "sample_byte_bits"]

# Entries of the read-ahead FIFOs: the entries in the read pipeline and the one leaving
# are all counted against it, so the pipeline's stages plus 2 keep one per cycle. MOVE's
# words: the sample memory's read (a `SegmentedRAM`); GATHER's beats: the RAM, the
# engine's word register and the lane register.
SMP_LATENCY = SegmentedRAM.LATENCY
WORD_FIFO_DEPTH = SMP_LATENCY + 2
BEAT_FIFO_DEPTH = 5
SAMPLE_WORD_BYTES = 4           # the sample memory: 32-bit words, little end first

# A FIFO entry: the element raw (for ``fill``) and in the cache's format (for ``lora``).
_BEAT = data.StructLayout({"raw": signed(16), "lora": signed(16), "first": 1, "last": 1})


def sample_byte_bits(cfg):
    """Width of a byte address of the sample memory (``sample_words`` bytes)."""
    return max(2, ceil_log2(cfg.sample_words))


class _RegionWalk:
    """The words of one layer's region of the activation buffer, pixel by pixel, each
    pixel's ``groups`` words in order: the word address, the word's group in its pixel
    and the pixels left. Registers in ``sync``; `start` and `next_word` add statements
    under the caller's condition. ``entry`` is a ``gather_layout`` layer entry."""

    def __init__(self, cfg):
        shapes = gather_layout(cfg).members["layers"].elem_shape.members
        self.cols = cfg.array_cols
        self.addr = Signal(ADDR_BITS)
        self.group = Signal(shapes["groups"])
        self.left = Signal(shapes["pixels"])
        # the current word is its pixel's last: registered, so that the lanes of a word
        # (which MOVE's merge depends on) come from a flip-flop and a multiplexer
        self.last = Signal()

    def last_word(self):
        return self.last & (self.left == 1)

    def lanes(self, entry):
        """Valid lanes of the current word: ``tail`` for a pixel's last word, else C."""
        return Mux(self.last, entry.tail, self.cols)

    def next_last(self, entry):
        """``last`` of the word after the current one."""
        return Mux(self.last, entry.groups == 1, self.group + 2 == entry.groups)

    def start(self, m, entry):
        m.d.sync += [self.addr.eq(entry.base), self.group.eq(0), self.left.eq(entry.pixels),
                     self.last.eq(entry.groups == 1)]

    def next_word(self, m, entry):
        m.d.sync += self.addr.eq(self.addr + 1)
        m.d.sync += self.last.eq(self.next_last(entry))
        with m.If(self.last):
            m.d.sync += [self.group.eq(0), self.left.eq(self.left - 1)]
        with m.Else():
            m.d.sync += self.group.eq(self.group + 1)


class GatherUnit(wiring.Component):
    """MOVE (a sample into layer 0's input) and GATHER (the adapter inputs and base logits
    out to the LoRA engine and/or the activation cache).

    Parameters
    ----------
    cfg : AccelConfig
        ``array_cols`` (C, lanes per activation word), ``max_layers``, ``max_classes``,
        ``max_adapter_in`` (the setup layouts), ``sample_words`` (bytes of the sample
        memory), ``max_samples`` and ``cache_samples`` (the index width); ``logit_bits``
        must be 16 (the layer engine's read lanes).

    Members
    -------
    setup : In(``firmware.isa.gather_layout(cfg)``)
        Register GATHER: ``n_layers``, ``classes`` and per layer ``base``, ``pixels``,
        ``groups`` and ``tail``. Held constant while ``busy``. The caller guarantees
        ``classes >= 1`` and, for every layer used, ``pixels >= 1``, ``groups >= 1`` and
        ``1 <= tail <= C``.
    fmt : In(``firmware.isa.cache_setup_layout(cfg)``)
        Register CACHE: ``bits4`` and per layer ``shift`` and ``signed`` format what goes
        to ``lora``; its ``n_layers``, ``classes`` and sizes are not read. Held while ``busy``.
    move : In(1),  src : In(:func:`sample_byte_bits`)
        MOVE strobe; ``src`` (sampled with it) is the byte address of the sample, whose
        ``d_0 = pixels_0 * ((groups_0 - 1) * C + tail_0)`` bytes are stored compactly in
        the (i, j, c) order.
    smp_addr : Out(sample_byte_bits - 2),  smp_data : In(32)
        Read port of the sample memory (32-bit words, byte ``a`` in bits ``8 * (a % 4)``
        up of word ``a // 4``): ``smp_data`` is the word at the ``smp_addr`` of
        `SMP_LATENCY` = 3 cycles before, from registers and a multiplexer
        (`gateware.segmented`). Read every cycle, no enable.
    load : Out(stream.Signature(``gateware.layer_engine.load_layout(C, acc_bits)``))
        MOVE's writes: ``mem`` = MEM_ACT, pixel ``p``'s word ``g`` at ``base_0 + p *
        groups_0 + g``, lanes past ``tail_0`` in a pixel's last word zero. The layer
        engine is always ready; a stalled ``load`` stalls the move.
    gather : In(1),  to_lora : In(1),  to_fill : In(1),  index : In(index_bits),
    label : In(class_bits)
        GATHER strobe; the destinations, the sample's cache line and its true class are
        sampled with it.
    rd_mem : Out(2),  rd_addr : Out(16),  rd_data : In(16 * C)
        The layer engine's read port: ``rd_data`` holds the lanes of the word at
        (``rd_mem``, ``rd_addr``) of two cycles before (int8 sign-extended for MEM_ACT,
        int16 for MEM_LOGIT). Valid only while the engine is idle, which the sequencer
        guarantees during a GATHER.
    lora : Out(stream.Signature(``gateware.layouts.sample_layout(cfg)``))
        One packet per GATHER with ``to_lora``: ``x_0 .. x_{n_layers-1}`` (each pixel by
        pixel, each pixel's words in order, the valid lanes of each word in lane order:
        the golden (i, j, c) flattening), then ``classes`` base logits from logit words 0,
        1, ... in lane order. Activations in the cache's format: unchanged if ``bits4`` =
        0, else ``four_bit_code(x, shift_l, signed_l) << shift_l`` (the code
        sign-extended for a signed layer); logits unchanged. ``label`` on every beat,
        ``first``/``last`` frame the packet.
    fill : Out(stream.Signature(``gateware.layouts.fill_layout(cfg)``))
        One packet per GATHER with ``to_fill``: the same elements raw (int8 activations,
        int16 logits), ``index`` on every beat, ``first``/``last``: the cache's fill.
    busy : Out(1)
        From the cycle after an accepted strobe until the move's last word is written
        (taken by ``load``) or the gather's last beat is taken by every chosen
        destination. A strobe while ``busy`` is ignored; ``move`` wins over a ``gather``
        in the same cycle.

    Timing
    ------
    - MOVE: the sample's words are read in order from the cycle of the strobe on (the
      strobe's ``src`` addresses the first) and queued in a
      `WORD_FIFO_DEPTH`-word (5) FIFO on credit; the first is at its head 4 cycles after the strobe. From then on each
      cycle takes the bytes of the head word that belong to the current activation
      word (up to 4, fewer at the end of either), and the activation word is on
      ``load`` in the cycle after its last byte was taken. ``busy`` falls ``T + 8`` or
      ``T + 9`` cycles after the strobe, once the words read past the sample's end have
      drained, ``T`` the sum over the activation words of the sample words each one's
      bytes lie in: ``d_0`` for one lane per word (one byte per cycle), ``2 * pixels *
      groups`` for whole words of C = 8 from a 4-aligned ``src``, ``3 * pixels *
      groups`` from any other.
    - GATHER: one element per cycle at full rate. An element's word is read in the cycle
      it is issued, registered in the engine the next, its lane registered the one
      after, and it enters the 5-entry beat FIFO (formatted) the cycle after; the first
      beat is on ``lora``/``fill`` 5 cycles after the strobe and ``busy`` falls the
      cycle after the last beat is taken: ``n + classes + 5`` cycles from the strobe
      with ``n = sum_l d_l`` (digits: 288 + 10 elements, 303 cycles). Elements are
      issued on credit (FIFO level plus the three pipeline stages below its depth), so
      a stalled destination stalls the reads without a combinational path from
      ``ready`` to the read port, and no element is lost. A beat
      leaves the FIFO when every chosen destination has taken it; each destination's
      ``valid`` falls once it has (a per-destination taken bit), independently of the
      other's ``ready``.

    Measured (tests/gateware/test_gather.py, on the layer engine, default configuration):
    digits MOVE of 64 bytes, words on ``load`` 5 .. 68 cycles after the strobe, ``busy``
    low from cycle 72 or 73; digits GATHER of 288 activations + 10 logits to both destinations,
    beats 5 .. 302 cycles after the strobe, ``busy`` low from cycle 303. The fan model's
    input (1, 1, 256): 72 cycles from a 4-aligned ``src``, 105 from another.
    """

    def __init__(self, cfg):
        if cfg.logit_bits != 16:
            raise ValueError(f"the layer engine reads int16 lanes; logit_bits is {cfg.logit_bits}")
        self._cfg = cfg
        C = cfg.array_cols
        byte_bits = sample_byte_bits(cfg)
        super().__init__({
            "setup":    In(gather_layout(cfg)),
            "fmt":      In(cache_setup_layout(cfg)),
            "move":     In(1),
            "src":      In(byte_bits),
            "smp_addr": Out(byte_bits - 2),
            "smp_data": In(8 * SAMPLE_WORD_BYTES),
            "load":     Out(stream.Signature(load_layout(C, cfg.acc_bits))),
            "gather":   In(1),
            "to_lora":  In(1),
            "to_fill":  In(1),
            "index":    In(index_bits(cfg)),
            "label":    In(class_bits(cfg)),
            "rd_mem":   Out(2),
            "rd_addr":  Out(ADDR_BITS),
            "rd_data":  In(16 * C),
            "lora":     Out(stream.Signature(sample_layout(cfg))),
            "fill":     Out(stream.Signature(fill_layout(cfg))),
            "busy":     Out(1),
        })

    def elaborate(self, platform):
        cfg = self._cfg
        C = cfg.array_cols
        m = Module()
        setup, fmt = self.setup, self.fmt

        # One walk and one lane counter serve both operations: they never overlap.
        walk = _RegionWalk(cfg)
        lane = Signal(range(C))

        moving = Signal()
        gathering = Signal()
        in_flight = Signal()            # GATHER beats in the read pipeline or the FIFO
        fetched = Signal()              # MOVE's words read ahead, in flight or in their FIFO
        m.d.comb += self.busy.eq(moving | self.load.valid | fetched | gathering | in_flight)

        # ------------------------------------------------------------ MOVE: fetch
        # A sample is stored compactly, so MOVE reads its words in order: they are read
        # ahead into a FIFO on credit, as GATHER's elements are.
        m.submodules.words = words = SyncFIFO(width=8 * SAMPLE_WORD_BYTES, depth=WORD_FIFO_DEPTH)
        fetching = Signal()
        f_addr = Signal(len(self.smp_addr))
        # a word in the sample memory's read, one signal per cycle; the last: on smp_data
        f = [Signal(name=f"f{k + 1}") for k in range(SMP_LATENCY)]
        f_credit = words.level + sum(f) < WORD_FIFO_DEPTH
        f_issue = fetching & f_credit
        move_strobe = ~self.busy & self.move            # a MOVE is taken (see "strobes")
        # idle, the strobe's ``src`` is addressed: its word is read in the strobe's cycle
        m.d.comb += self.smp_addr.eq(Mux(fetching, f_addr, self.src[2:]))
        m.d.sync += [f[0].eq(f_issue | move_strobe)]
        m.d.sync += [b.eq(a) for a, b in zip(f, f[1:])]
        with m.If(f_issue):
            m.d.sync += f_addr.eq(f_addr + 1)
        m.d.comb += [words.w_data.eq(self.smp_data), words.w_en.eq(f[-1]),
                     fetched.eq(Cat(f).any() | words.r_rdy)]

        # ------------------------------------------------------------ MOVE: merge
        # A step moves ``take`` bytes of the FIFO's head (the sample word whose bytes from
        # ``off`` on are unused) into lanes ``lane`` on of the activation word, which
        # has ``need`` lanes left to fill. The steps depend on the walk, not on the data,
        # so each step's controls are worked out one step ahead into registers: the
        # head's bytes pass only a lane's byte select and a multiplexer into ``word``.
        entry0 = setup.layers[0]
        word = Signal(8 * C)            # the activation word's lanes taken so far
        off = Signal(2)
        need = Signal(range(C + 1))                             # 1 .. C
        take = Signal(range(SAMPLE_WORD_BYTES + 1))             # min(need, 4 - off)
        upto = Signal(range(C + SAMPLE_WORD_BYTES + 1))         # lane + take
        word_end = Signal()                                     # need <= 4 - off
        pop = Signal()                                          # need >= 4 - off
        rel = Signal(2)                                         # off - lane, mod 4

        def plan(need_n, off_n, lane_n):
            """The registers of the step whose need, off and lane are these."""
            avail_n = SAMPLE_WORD_BYTES - off_n
            take_n = Mux(need_n <= avail_n, need_n, avail_n)
            return [need.eq(need_n), off.eq(off_n), take.eq(take_n), upto.eq(lane_n + take_n),
                    word_end.eq(need_n <= avail_n), pop.eq(need_n >= avail_n),
                    rel.eq(off_n - lane_n)]

        # lane i takes byte (i - lane + off) mod 4 of the head when lane <= i < lane + take
        merged = Signal(8 * C)
        for i in range(C):
            taken = (i >= lane) & (i < upto)
            byte = words.r_data.word_select((i + rel)[:2], 8)
            m.d.comb += merged.word_select(i, 8).eq(Mux(taken, byte, word.word_select(i, 8)))

        # a named signal: inline in plan()'s arguments, this Mux makes yosys 0.70's abc9
        # reintegration fail an assertion
        next_lanes = Signal(range(C + 1))                       # of the next word
        m.d.comb += next_lanes.eq(Mux(walk.next_last(entry0), entry0.tail, C))
        step = moving & words.r_rdy & (~self.load.valid | self.load.ready)
        # the head is used up when this step takes its last byte; once the move is done
        # the words read ahead are dropped as they arrive
        m.d.comb += words.r_en.eq(Mux(moving, step & pop, words.r_rdy))

        with m.If(self.load.ready):
            m.d.sync += self.load.valid.eq(0)
        with m.If(step):
            with m.If(word_end):
                m.d.sync += [
                    self.load.valid.eq(1),
                    self.load.payload.mem.eq(MEM_ACT),
                    self.load.payload.addr.eq(walk.addr),
                    self.load.payload.data.eq(merged),
                    word.eq(0),         # the lanes past the tail stay zero
                    lane.eq(0),
                ]
                m.d.sync += plan(next_lanes, (off + take)[:2], 0)
                walk.next_word(m, entry0)
                with m.If(walk.last_word()):
                    m.d.sync += [moving.eq(0), fetching.eq(0)]
            with m.Else():
                # the head is used up (take = 4 - off): the next step starts a new one
                m.d.sync += [word.eq(merged), lane.eq(lane + take)]
                m.d.sync += plan(need - take, 0, lane + take)

        # ------------------------------------------------------------ GATHER: issue
        layer = Signal(range(cfg.max_layers))
        logit = Signal()                # issuing logits (after the last layer)
        cls_left = Signal(range(cfg.max_classes + 1))
        first = Signal()
        sel = Signal(data.StructLayout({"lora": 1, "fill": 1}))
        index = Signal.like(self.index)
        label = Signal.like(self.label)

        m.submodules.fifo = fifo = SyncFIFO(width=_BEAT.size, depth=BEAT_FIFO_DEPTH)
        meta = data.StructLayout({"lane": range(C), "logit": 1, "shift": 3, "signed": 1,
                                  "first": 1, "last": 1})
        s1, s1_valid = Signal(meta), Signal()           # the word is read
        s2, s2_valid = Signal(meta), Signal()           # the word is on rd_data
        s3, s3_valid = Signal(meta), Signal()           # its lane is registered
        s3_value = Signal(signed(16))
        m.d.comb += in_flight.eq(s1_valid | s2_valid | s3_valid | fifo.r_rdy)
        credit = fifo.level + s1_valid + s2_valid + s3_valid < BEAT_FIFO_DEPTH

        entry = setup.layers[layer]
        final = logit & (cls_left == 1)
        issue = gathering & credit
        m.d.comb += [self.rd_addr.eq(walk.addr), self.rd_mem.eq(Mux(logit, MEM_LOGIT, MEM_ACT))]
        m.d.sync += [
            s1_valid.eq(issue),
            s1.lane.eq(lane),
            s1.logit.eq(logit),
            s1.shift.eq(fmt.layers[layer].shift),
            s1.signed.eq(fmt.layers[layer].signed),
            s1.first.eq(first),
            s1.last.eq(final),
        ]
        with m.If(issue):
            m.d.sync += first.eq(0)
            with m.If(logit):
                m.d.sync += cls_left.eq(cls_left - 1)
                with m.If(lane == C - 1):
                    m.d.sync += [lane.eq(0), walk.addr.eq(walk.addr + 1)]
                with m.Else():
                    m.d.sync += lane.eq(lane + 1)
                with m.If(final):
                    m.d.sync += gathering.eq(0)
            with m.Elif(lane + 1 == walk.lanes(entry)):
                m.d.sync += lane.eq(0)
                walk.next_word(m, entry)
                with m.If(walk.last_word()):
                    with m.If(layer + 1 == setup.n_layers):
                        m.d.sync += [logit.eq(1), walk.addr.eq(0)]
                    with m.Else():
                        m.d.sync += layer.eq(layer + 1)
                        walk.start(m, setup.layers[layer + 1])
            with m.Else():
                m.d.sync += lane.eq(lane + 1)

        # ------------------------------------------------------------ strobes
        with m.If(move_strobe):
            m.d.sync += [moving.eq(1), word.eq(0), lane.eq(0),
                         fetching.eq(1), f_addr.eq(self.src[2:] + 1)]
            m.d.sync += plan(Mux(entry0.groups == 1, entry0.tail, C), self.src[:2], 0)
            walk.start(m, entry0)
        with m.Elif(~self.busy & self.gather):
            m.d.sync += [
                gathering.eq(1), layer.eq(0), lane.eq(0), first.eq(1),
                logit.eq(setup.n_layers == 0), cls_left.eq(setup.classes),
                sel.lora.eq(self.to_lora), sel.fill.eq(self.to_fill),
                index.eq(self.index), label.eq(self.label),
            ]
            walk.start(m, entry0)
            with m.If(setup.n_layers == 0):
                m.d.sync += walk.addr.eq(0)

        # ------------------------------------------------------------ GATHER: format
        # The element's lane goes into a register, then is formatted into the FIFO.
        m.d.sync += [s2_valid.eq(s1_valid), s2.eq(s1), s3_valid.eq(s2_valid), s3.eq(s2),
                     s3_value.eq(self.rd_data.word_select(s2.lane, 16).as_signed())]
        code = four_bit_code(s3_value[:8].as_signed(), s3.shift, s3.signed)
        value4 = Mux(s3.signed, code.as_signed(), code) << s3.shift
        beat = Signal(_BEAT)
        m.d.comb += [
            beat.raw.eq(s3_value),
            beat.lora.eq(Mux(fmt.bits4 & ~s3.logit, value4, s3_value)),
            beat.first.eq(s3.first),
            beat.last.eq(s3.last),
            fifo.w_data.eq(beat),
            fifo.w_en.eq(s3_valid),
        ]

        # ------------------------------------------------------------ GATHER: deliver
        head = data.View(_BEAT, fifo.r_data)
        took = Signal(data.StructLayout({"lora": 1, "fill": 1}))   # this beat, already
        m.d.comb += [
            self.lora.valid.eq(fifo.r_rdy & sel.lora & ~took.lora),
            self.lora.payload.data.eq(head.lora),
            self.lora.payload.label.eq(label),
            self.lora.payload.first.eq(head.first),
            self.lora.payload.last.eq(head.last),
            self.fill.valid.eq(fifo.r_rdy & sel.fill & ~took.fill),
            self.fill.payload.data.eq(head.raw),
            self.fill.payload.index.eq(index),
            self.fill.payload.first.eq(head.first),
            self.fill.payload.last.eq(head.last),
        ]
        done = [~sel[d] | took[d] | getattr(self, d).ready for d in ("lora", "fill")]
        retire = fifo.r_rdy & done[0] & done[1]
        m.d.comb += fifo.r_en.eq(retire)
        with m.If(retire):
            m.d.sync += took.eq(0)
        with m.Else():
            for d in ("lora", "fill"):
                port = getattr(self, d)
                with m.If(port.valid & port.ready):
                    m.d.sync += took[d].eq(1)
        return m
