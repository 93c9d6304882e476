"""Weight-update unit: shift-Adam on the int32 master weights of the adapters, one weight
per cycle, with the stochastic rounding of the step drawn from a 32-bit Galois LFSR.

# Ref: docs/numerics.md section 9 "Update: shift-Adam" and section 10 "LFSR and stochastic
# rounding" (the formulas below, bit for bit)

    g     = sat32(rshift_round(dW, f_d - F_n))
    M     = sat_{m_bits}(M + g - rshift_round(M, b1))
    g2    = rshift_round(g * g, 2 F_n - F_v)
    V     = clip(V + g2 - rshift_round(V, b2), 0, 2^v_bits - 1)
    e     = max((bitlen(V) - F_v - b2) >> 1, e_min)               (>> is floor)
    shift = exp + e + F_n + b1 - F_m
    W     = sat_{master_bits}(W - SR(M * mant, shift))

with ``rshift_round(v, s) = (v + 2^(s-1)) >> s`` (an exact left shift for ``s <= 0``),
``SR(a, s) = (a + (rand >> (32 - s))) >> s`` for ``0 < s <= 32`` and ``a << -s`` for
``s <= 0``, and ``rand`` the LFSR state *after* this weight's step. Everything here is
written from those formulas; nothing is imported from ``sim/`` (the golden model must not
share code with the hardware it checks).
"""

from amaranth import C, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .config import DEFAULT, AccelConfig

__all__ = ["UpdateUnit", "update_in_layout", "update_out_layout",
           "DW_BITS", "FSHIFT_BITS", "EXP_BITS", "G_BITS", "LFSR_BITS"]

# Batch-summed gradient accumulator entering the unit. docs/numerics.md section 8 bounds
# |dA_l| by 2^30 (32 bits signed) and |dB_l| by 2^37 (39 bits signed) for every schedule
# check_limits admits; 48 bits leave 9 bits of headroom for larger limits.
DW_BITS = 48
# f_d - F_n, the gradient's shift to F_n: -1 .. 2 (A_l) and 8 (B_l) for the shipped digits
# and fan models. Any value in [-32, 31] is computed exactly.
FSHIFT_BITS = 6
# Learning-rate exponent: lr = mant * 2^-exp. check_limits keeps exp in [11, 29]; 7 bits
# also hold lr_mantissa(1e-5), exp = 32.
EXP_BITS = 7
# The aligned gradient g (int32) and the LFSR state.
G_BITS = 32
LFSR_BITS = 32

# Operand chunk of a partial product: 17 bits unsigned fit a MULT18X18D's 18-bit signed
# input; the top chunk of a signed operand is signed and at most 18 bits.
_CHUNK = 17


def update_in_layout(cfg):
    """One weight entering the update unit, in the order A_0, B_0, A_1, B_1, ... (each
    row-major). ``fshift`` is ``f_d - F_n`` of the weight's tensor (``s_x[l] + F_e - F_n``
    for ``A_l``, ``F_h + F_g - F_n`` for ``B_l``); ``last`` marks the update's last weight
    and is passed through."""
    return data.StructLayout({
        "w": signed(cfg.master_bits),       # master weight at F_m
        "m": signed(cfg.m_bits),            # first moment at F_n + beta1_shift
        "v": unsigned(cfg.v_bits),          # second moment at F_v + beta2_shift
        "d": signed(DW_BITS),               # batch-summed gradient at f_d
        "fshift": signed(FSHIFT_BITS),      # f_d - F_n
        "last": unsigned(1),
    })


def update_out_layout(cfg):
    """One updated weight leaving the unit, in the input's order."""
    return data.StructLayout({
        "w": signed(cfg.master_bits),
        "m": signed(cfg.m_bits),
        "v": unsigned(cfg.v_bits),
        "last": unsigned(1),
    })


def _rshift_round(value, shift):
    """``(value + 2^(shift-1)) >> shift`` by a constant; an exact left shift for ``shift <= 0``."""
    if shift > 0:
        return (value + (1 << (shift - 1))) >> shift
    return value << -shift


def _saturate(value, lo, hi):
    return Mux(value > hi, hi, Mux(value < lo, lo, value))


def _chunks(width):
    """(offset, width) of the _CHUNK-bit pieces of a ``width``-bit operand, low first."""
    return [(o, min(_CHUNK, width - o)) for o in range(0, width, _CHUNK)]


class UpdateUnit(wiring.Component):
    """shift-Adam update of one master weight per cycle.

    Parameters
    ----------
    cfg : AccelConfig
        Uses ``master_bits``, ``F_m``, ``F_n``, ``F_v``, ``beta1_shift``, ``beta2_shift``,
        ``m_bits``, ``v_bits``, ``e_min``, ``lr_mant_bits`` (at most 17) and ``lfsr_taps``.

    Members
    -------
    i_stream : In(stream.Signature(update_in_layout(cfg)))
        One weight per beat: ``w``, ``m``, ``v``, ``d`` (``DW_BITS`` = 48 signed),
        ``fshift = f_d - F_n`` (signed, ``FSHIFT_BITS`` = 6: any shift in [-32, 31] is
        exact) and ``last`` (passed through). ``fshift`` rides in the beat rather than on a
        port so that the tensors of an update can follow one another without draining.
    o_stream : Out(stream.Signature(update_out_layout(cfg)))
        ``w``, ``m``, ``v`` after the update, and ``last``, in the input's order.
    mant : In(unsigned(lr_mant_bits)),  exp : In(signed(EXP_BITS))
        The learning rate ``lr = mant * 2^-exp`` (as ``lr_mantissa`` computes it on the
        host). Read by the pipeline in flight: hold them while any beat of an update is
        between ``i_stream`` and ``o_stream``. An ``exp`` that makes ``shift`` exceed 32
        lies outside the rule (the golden model refuses it; check_limits keeps ``exp`` in
        [11, 29], i.e. ``shift`` in [-6, 31]); the unit then uses all 32 random bits.
    seed : In(32),  seed_load : In(1)
        A cycle with ``seed_load`` high loads the LFSR with ``seed`` (0 is replaced by 1).
        Load it once per fine-tune, before its first update; the state then runs on across
        batches and epochs. A load in the same cycle as an accepted beat wins; that beat
        still takes the step of the old state.
    lfsr : Out(32)
        The current LFSR state: after an update has been accepted, the state after its
        last weight's step (``sim.fixed.Lfsr.state``). Reset value 1.

    Structure and timing
    --------------------
    The LFSR, ``s = (s >> 1) ^ (s & 1 ? lfsr_taps : 0)``, steps once per accepted beat; the
    beat takes the new state as its random word. Behind the input register, 13 pipeline
    stages in all, every one registered:

    1. input register (the beat and its random word);
    2. ``d + 2^(fshift-1)`` (rounding term of g); ``M - rshift_round(M, b1)``,
       ``V - rshift_round(V, b2)`` (never negative, so the clip at 0 never acts);
    3. ``g``: barrel shift by ``fshift`` and saturation to int32;
    4. ``M'`` (saturated to ``m_bits``); ``|g|`` and the flag ``|g| >= 2^t``
       (``t = ceil((v_bits + 2 F_n - F_v) / 2)`` = 28), beyond which ``g2 >= 2^v_bits``;
    5. partial products, registered: ``|g|^2`` from 17-bit pieces of ``|g| mod 2^t``
       (``a_h^2, a_h a_l, a_l^2``: 3 multipliers by symmetry) and ``M' * mant`` from
       17-bit pieces of ``M'`` (3 multipliers);
    6. their sums: ``g*g + 2^(2F_n - F_v - 1)`` and ``M' * mant``;
    7. ``V'`` = ``V - rshift_round(V, b2) + g2``, clipped to ``2^v_bits - 1``;
    8. ``bitlen(V') >= F_v + b2 + 2 j`` for every ``j`` in ``(e_min, e_max]``, a
       thermometer code (``e`` needs no leading-one encoder);
    9. ``shift = exp + F_n + b1 - F_m + e_min + popcount``;
    10. ``r = rand >> (32 - shift)`` (0 for ``shift <= 0``);
    11. ``M' * mant + r``;
    12. the step, ``>> shift`` or ``<< -shift``, clamped to ``+-2^master_bits`` (a step
        beyond that saturates ``W`` whatever it is);
    13. ``W' = sat(W - step)``: the output register.

    Latency 13 cycles: a beat accepted at clock edge ``k`` is on ``o_stream`` (valid) after
    edge ``k + 13``. Throughput one weight per cycle. All stages advance together when
    ``~o_stream.valid | o_stream.ready``, so ``i_stream.ready`` is exactly that (it
    depends combinationally on ``o_stream.ready``); a stalled output holds the whole
    pipeline, bubbles included.

    Multipliers: 6 MULT18X18D with the default configuration (3 for the square, 3 for
    ``M * mant``; 40 x 16 bits is three 17/17/6 x 16 products).
    """

    def __init__(self, cfg=DEFAULT):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        if cfg.lr_mant_bits > _CHUNK:
            raise ValueError(f"lr_mant_bits above {_CHUNK} needs a wider multiplier split")
        if cfg.m_bits < 2 or cfg.v_bits < 1 or cfg.master_bits < 2:
            raise ValueError("m_bits, v_bits and master_bits are too small")
        if cfg.beta1_shift < 0 or cfg.beta2_shift < 0:
            raise ValueError("beta shifts must not be negative")
        self._cfg = cfg
        super().__init__({
            "i_stream": In(stream.Signature(update_in_layout(cfg))),
            "o_stream": Out(stream.Signature(update_out_layout(cfg))),
            "mant": In(unsigned(cfg.lr_mant_bits)),
            "exp": In(signed(EXP_BITS)),
            "seed": In(LFSR_BITS),
            "seed_load": In(1),
            "lfsr": Out(LFSR_BITS, init=1),
        })

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        b1, b2 = cfg.beta1_shift, cfg.beta2_shift
        mb, vb = cfg.master_bits, cfg.v_bits
        mbits = cfg.m_bits
        q = 2 * cfg.F_n - cfg.F_v                   # shift of g*g to F_v
        k_v = cfg.F_v + b2                          # fraction bits of V
        e_max = max((vb - k_v) >> 1, cfg.e_min)     # largest e (bitlen(V) <= v_bits)
        t_bits = min(max(-(-(vb + q) // 2), 0), G_BITS)  # |g| >= 2^t gives g2 >= 2^vb

        i, o = self.i_stream, self.o_stream
        en = Signal()                               # every stage advances
        m.d.comb += [en.eq(~o.valid | o.ready), i.ready.eq(en)]
        take = i.valid & i.ready

        # --- LFSR ----------------------------------------------------------------------
        state = self.lfsr
        nxt = Signal(LFSR_BITS)
        m.d.comb += nxt.eq((state >> 1) ^ Mux(state[0], cfg.lfsr_taps, 0))
        with m.If(self.seed_load):
            m.d.sync += state.eq(Mux(self.seed == 0, 1, self.seed))
        with m.Elif(take):
            m.d.sync += state.eq(nxt)

        # --- pipeline ------------------------------------------------------------------
        n_stages = 13
        valid = Signal(n_stages)
        last = Signal(n_stages)
        with m.If(en):
            m.d.sync += [valid.eq(Cat(i.valid, valid[:-1])),
                         last.eq(Cat(i.payload.last, last[:-1]))]

        def stage(value, shape, name):
            """A register that takes ``value`` when the pipeline advances."""
            reg = Signal(shape, name=name)
            with m.If(en):
                m.d.sync += reg.eq(value)
            return reg

        def carry(reg, upto, first):
            """``reg`` delayed from stage ``first`` to every stage through ``upto``:
            {stage: register}."""
            regs = {first: reg}
            for s in range(first + 1, upto + 1):
                regs[s] = stage(regs[s - 1], reg.shape(), f"{reg.name.rsplit('_s', 1)[0]}_s{s}")
            return regs

        p = i.payload
        # 1: input register
        w1 = stage(p.w, signed(mb), "w_s1")
        m1 = stage(p.m, signed(mbits), "m_s1")
        v1 = stage(p.v, unsigned(vb), "v_s1")
        d1 = stage(p.d, signed(DW_BITS), "d_s1")
        sh1 = stage(p.fshift, signed(FSHIFT_BITS), "fshift_s1")
        rand1 = stage(nxt, unsigned(LFSR_BITS), "rand_s1")
        ws = carry(w1, 12, 1)
        rands = carry(rand1, 10, 1)

        # 2: rounding term of g; the decayed moments
        rsh_max = (1 << (FSHIFT_BITS - 1)) - 1
        lsh_max = 1 << (FSHIFT_BITS - 1)
        rsh1 = Mux(sh1 > 0, sh1, 0).as_unsigned()[:FSHIFT_BITS - 1]
        lsh1 = Mux(sh1 < 0, -sh1, 0).as_unsigned()[:FSHIFT_BITS]
        d2 = stage(d1 + ((C(1, 1) << rsh1) >> 1), signed(DW_BITS + 1), "dr_s2")
        rsh2 = stage(rsh1, range(rsh_max + 1), "rsh_s2")
        lsh2 = stage(lsh1, range(lsh_max + 1), "lsh_s2")
        mpart2 = stage(m1 - _rshift_round(m1, b1), signed(mbits + 1), "mpart_s2")
        vpart2 = stage(v1 - _rshift_round(v1, b2), unsigned(vb), "vpart_s2")
        mparts = carry(mpart2, 3, 2)
        vparts = carry(vpart2, 6, 2)   # the V line waits for g2

        # 3: g
        g_lo, g_hi = -(1 << (G_BITS - 1)), (1 << (G_BITS - 1)) - 1
        g_wide = Mux(lsh2 != 0, d2 << lsh2, d2 >> rsh2)
        g3 = stage(_saturate(g_wide, g_lo, g_hi), signed(G_BITS), "g_s3")

        # 4: M'; |g| and its overflow flag
        m_lo, m_hi = -(1 << (mbits - 1)), (1 << (mbits - 1)) - 1
        mnew4 = stage(_saturate(mparts[3] + g3, m_lo, m_hi), signed(mbits), "mnew_s4")
        mnews = carry(mnew4, 13, 4)
        abs_g = Mux(g3 < 0, -g3, g3).as_unsigned()[:G_BITS]
        a4 = stage(abs_g[:t_bits] if t_bits else C(0, 1), unsigned(max(t_bits, 1)), "absg_s4")
        big4 = stage((abs_g >> t_bits) != 0, 1, "big_s4")
        bigs = carry(big4, 6, 4)

        # 5: partial products, each a registered multiplier output
        a_chunks = _chunks(t_bits) if t_bits else []
        sq_terms = []                                # (register, offset)
        for x, (ox, wx) in enumerate(a_chunks):
            for y, (oy, wy) in enumerate(a_chunks[x:], start=x):
                prod = a4[ox:ox + wx] * a4[oy:oy + wy]
                reg = stage(prod, unsigned(wx + wy), f"sq_pp{x}{y}_s5")
                sq_terms.append((reg, ox + oy + (1 if x != y else 0)))
        mm_terms = []
        m_chunks = _chunks(mbits)
        for x, (ox, wx) in enumerate(m_chunks):
            piece = mnew4[ox:ox + wx]
            if x == len(m_chunks) - 1:
                piece = piece.as_signed()
                prod = piece * self.mant
                shape = signed(wx + cfg.lr_mant_bits + 1)
            else:
                prod = piece * self.mant
                shape = unsigned(wx + cfg.lr_mant_bits)
            mm_terms.append((stage(prod, shape, f"mm_pp{x}_s5"), ox))

        # 6: the sums (g*g with its rounding term)
        sq_sum = sum(reg << off for reg, off in sq_terms) if sq_terms else C(0, 1)
        sq_round = (1 << (q - 1)) if q > 0 else 0
        sq6 = stage(sq_sum + sq_round, unsigned(2 * max(t_bits, 1) + 1), "sqr_s6")
        mm_bits = mbits + cfg.lr_mant_bits + 1
        mm6 = stage(sum(reg << off for reg, off in mm_terms), signed(mm_bits), "mm_s6")
        mms = carry(mm6, 10, 6)

        # 7: V'
        g2 = sq6 >> q if q > 0 else sq6 << -q
        v_sum = vparts[6] + g2
        v_max = (1 << vb) - 1
        vnew7 = stage(Mux(bigs[6] | (v_sum > v_max), v_max, v_sum), unsigned(vb), "vnew_s7")
        vnews = carry(vnew7, 13, 7)

        # 8: thermometer code of e: bit j - e_min - 1 is e >= j, i.e. bitlen(V') >= k_v + 2j
        therm = []
        for j in range(cfg.e_min + 1, e_max + 1):
            n = k_v + 2 * j
            if n <= 0:
                therm.append(C(1, 1))
            elif n - 1 >= vb:
                therm.append(C(0, 1))
            else:
                therm.append((vnew7 >> (n - 1)) != 0)
        therm8 = stage(Cat(*therm) if therm else C(0, 1), max(len(therm), 1), "therm_s8")

        # 9: the shift of the step
        base = cfg.F_n + b1 - cfg.F_m + cfg.e_min
        shift_lo = -(1 << (EXP_BITS - 1)) + base
        shift_hi = (1 << (EXP_BITS - 1)) - 1 + base + len(therm)
        shift_shape = signed(max(shift_lo.bit_length(), shift_hi.bit_length()) + 1)
        count = sum(therm8[k] for k in range(len(therm))) if therm else C(0, 1)
        shift9 = stage(self.exp + base + count, shift_shape, "shift_s9")
        shifts = carry(shift9, 12, 9)

        # 10: random bits r = rand >> (32 - shift), all 32 beyond a shift of 32
        s9 = shift9
        rs = Mux(s9 >= LFSR_BITS, 0, LFSR_BITS - s9).as_unsigned()[:(LFSR_BITS).bit_length()]
        r10 = stage(Mux(s9 > 0, rands[9] >> rs, 0), unsigned(LFSR_BITS), "r_s10")

        # 11: M * mant + r
        sum11 = stage(mms[10] + r10, signed(mm_bits + 1), "sum_s11")

        # 12: the step, clamped to +-2^master_bits
        s11 = shifts[11]
        right = Mux(s11 > 0, s11, 0).as_unsigned()[:shift_shape.width - 1]
        left_max = mb + 1                            # any non-zero step << left_max clamps
        left = Mux(s11 < -left_max, left_max, Mux(s11 < 0, -s11, 0)).as_unsigned()
        left = left[:left_max.bit_length()]
        step_wide = Mux(s11 > 0, sum11 >> right, sum11 << left)
        lim = 1 << mb
        step12 = stage(_saturate(step_wide, -lim, lim), signed(mb + 2), "step_s12")

        # 13: W'
        w_lo, w_hi = -(1 << (mb - 1)), (1 << (mb - 1)) - 1
        wnew13 = stage(_saturate(ws[12] - step12, w_lo, w_hi), signed(mb), "wnew_s13")

        m.d.comb += [
            o.valid.eq(valid[-1]),
            o.payload.w.eq(wnew13),
            o.payload.m.eq(mnews[13]),
            o.payload.v.eq(vnews[13]),
            o.payload.last.eq(last[-1]),
        ]
        return m
