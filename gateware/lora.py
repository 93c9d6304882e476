"""LoRA engine: the adapter datapath, the loss unit and the weight-update unit joined into
the fine-tuning step of Skip2-LoRA, with the shift-Adam moments of every adapter weight.

# Ref: docs/numerics.md sections 6-10; sim/finetune.py `finetune_fixed` is the loop this
# runs, one batch at a time: per sample ``adapter_forward``, ``loss_grad`` and the
# accumulation of ``adapter_grads``; per batch ``update``.

Nothing here is imported from ``sim/``.
"""

from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from firmware.isa import FSHIFT_BITS, lora_setup_layout

from .adapter import AdapterDatapath, master_port, next_multiple, row_mask
from .config import DEFAULT, AccelConfig
from .layouts import class_bits, sample_layout
from .loss import LossUnit
from .ram import read_register
from .update import EXP_BITS, LATENCY, LFSR_BITS, UpdateUnit

__all__ = ["LoraEngine", "lora_setup_layout", "COUNTER_BITS"]

# Width of the sample, correct-prediction and cycle counters.
COUNTER_BITS = 32


class LoraEngine(wiring.Component):
    """Skip2-LoRA fine-tuning step: adapter forward, loss, gradient accumulation, and the
    shift-Adam update of every adapter weight.

    Parameters
    ----------
    cfg : AccelConfig
        Everything `AdapterDatapath`, `LossUnit` and `UpdateUnit` use, and
        ``adapter_words`` (depth of the moment memories), ``m_bits``, ``v_bits``.

    Members
    -------
    setup : In(:func:`lora_setup_layout`)
        Hold it constant while ``busy``.
    mant : In(unsigned(lr_mant_bits)),  exp : In(signed(EXP_BITS))
        Learning rate ``mant * 2^-exp`` (``lr_mantissa``). Hold while ``busy``.
    seed : In(32),  seed_load : In(1),  lfsr : Out(32)
        The update unit's LFSR (`UpdateUnit`): load once per fine-tune, before its first
        update; ``lfsr`` is the state after the last weight's step.
    i_stream : In(stream.Signature(sample_layout(cfg)))
        One sample: ``sum_l d_l`` adapter inputs ``x_l`` layer by layer, then C base
        logits, the label on the last logit (the activation cache's read order). Not
        ready while an update runs or waits to run.
    update : In(1)
        Strobe, after the last sample of a batch has been sent: once the last sample's
        gradients are accumulated, every weight in the order ``A_0, B_0, A_1, B_1, ...``
        (each row-major; the walk steps over the ADAPTERS layout's padding,
        `firmware.memmap.adapter_bases`) is read with its moments ``M``, ``V`` and its
        accumulator, updated, and written back; each accumulator is cleared as it is
        read, so the next batch starts from zero.
    reset_moments : In(1)
        Strobe: zero ``M`` and ``V`` of every weight (``adapter_words`` cycles, ``busy``
        high). Pulse it once per fine-tune, with the masters loaded and the accumulators
        cleared. It waits for a running update.
    clear_grads : In(1)
        Strobe, passed to `AdapterDatapath`: zero every accumulator.
    mem_addr, mem_re, mem_we, mem_clr, mem_wdata, mem_rmaster, mem_rgrad
        `AdapterDatapath`'s memory port (masters and accumulators at their packed
        addresses, read in two cycles), passed through while no update runs (ignored
        during one).
    pred_valid : Out(1),  pred : Out(class_bits),  correct : Out(1)
        A one-cycle pulse per sample, as its last gradient leaves the loss unit: the
        prediction ``argmax(z)`` (ties to the lowest class) and whether it is the label.
    n_samples, n_correct : Out(32)
        Samples through the loss unit, and how many of them were predicted correctly.
    fwd_cycles : Out(32)
        Cycles in which a sample is in the adapter (from the cycle that accepts its first
        beat until its gradients are written; also a ``clear_grads`` sweep).
    upd_cycles : Out(32)
        Cycles of the update phase, from its first read until its last write.
    clear_counters : In(1)
        Strobe: zero the four counters above.
    busy : Out(1)
        A sample in flight, an update or a moment reset pending or running.

    Storage
    -------
    The masters and the accumulators live in the adapter datapath. ``M`` (signed
    ``m_bits``) and ``V`` (unsigned ``v_bits``), ``adapter_words`` deep each, at the
    address of their weight: 40 + 48 bits x 4096 with the defaults (about 20 DP16KD).

    Timing
    ------
    A sample runs through the adapter's forward pass, the loss unit and the adapter's
    gradient pass one after the other (the adapter holds one sample and waits for its
    ``g``). With ``n = sum_l d_l``, ``L`` layers, rank ``r``, ``C`` classes, at full rate
    (``fwd_cycles`` per sample, from the cycle that accepts its first beat to the first
    cycle with the adapter idle):

        (n + max(C, r + 8 + log2 P) + L r + C + 9)   adapter forward, to the last z
      + (C + 28)                                      loss unit, last z to first g
      + (C + 2 L r + n + 7)                           gradient accumulation
      = 2 n + max(C, r + 8 + log2 P) + 3 L r + 3 C + 44

    The update of ``N = sum_l (d_l r + r C)`` weights issues one weight per cycle (a jump
    over padding costs nothing): master, accumulator, ``M`` and ``V`` read (and the
    accumulator cleared) in cycle ``t``, the beat in `UpdateUnit` at ``t + 2``, the result
    written back at the same address ``LATENCY`` cycles later; ``N + LATENCY + 2`` cycles
    (``upd_cycles``). It starts one cycle after the ``update`` strobe, or after the last
    sample's gradients if they are still in flight. The update unit's output is never
    stalled, so it needs no buffer.

    Measured (tests/gateware/cocotb_lora.py, digits, rank 4: n = 288, L = 4, C = 10):
    714 cycles per sample for 1312 + 1472 MACs (3.9 MACs per cycle), 1329 cycles per
    update of 1312 weights (8.5 % of a batch of 20), so one cached epoch of the 359 digits
    samples (18 batches) takes 780.6 cycles per sample, 280k cycles (2.8 ms at 100 MHz).
    Most of a sample's cycles are the ``2 n`` rows of ``A_l`` (forward and ``dA``), each
    using ``r`` of the adapter's ``P`` lanes; packing ``P / r`` rows per cycle (the
    adapter's docstring) is the next step, then hiding the loss unit's ``C + 28`` cycles
    behind the next sample's forward pass (a second sample buffer in the adapter).
    """

    def __init__(self, cfg=DEFAULT):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        self._cfg = cfg
        self._aw = max(1, ceil_log2(cfg.adapter_words))
        super().__init__({
            "setup": In(lora_setup_layout(cfg)),
            "mant": In(unsigned(cfg.lr_mant_bits)),
            "exp": In(signed(EXP_BITS)),
            "seed": In(LFSR_BITS),
            "seed_load": In(1),
            "lfsr": Out(LFSR_BITS, init=1),
            "i_stream": In(stream.Signature(sample_layout(cfg))),
            "update": In(1),
            "reset_moments": In(1),
            "clear_grads": In(1),
            **master_port(cfg),
            "pred_valid": Out(1),
            "pred": Out(class_bits(cfg)),
            "correct": Out(1),
            "n_samples": Out(COUNTER_BITS),
            "n_correct": Out(COUNTER_BITS),
            "fwd_cycles": Out(COUNTER_BITS),
            "upd_cycles": Out(COUNTER_BITS),
            "clear_counters": In(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        m.submodules.adapter = ad = AdapterDatapath(cfg, write_addr=True)
        m.submodules.loss = loss = LossUnit(cfg)
        m.submodules.upd = upd = UpdateUnit(cfg)
        m.submodules.mmem = mmem = Memory(shape=signed(cfg.m_bits), depth=cfg.adapter_words, init=[])
        m.submodules.vmem = vmem = Memory(shape=unsigned(cfg.v_bits), depth=cfg.adapter_words, init=[])
        mr, mw = mmem.read_port(), mmem.write_port()
        vr, vw = vmem.read_port(), vmem.write_port()

        setup = self.setup.adapter
        n_layers, rank, classes = setup.n_layers, setup.rank, setup.classes

        # --- sample path: i_stream -> adapter -> loss -> adapter ----------------------
        wiring.connect(m, ad.o_stream, loss.i_stream)
        wiring.connect(m, loss.o_stream, ad.g_stream)
        m.d.comb += ad.setup.eq(setup)
        hold = Signal()
        m.d.comb += [
            ad.i_stream.payload.eq(self.i_stream.payload),
            ad.i_stream.valid.eq(self.i_stream.valid & ~hold),
            self.i_stream.ready.eq(ad.i_stream.ready & ~hold),
            ad.clear_grads.eq(self.clear_grads),
        ]

        # --- learning rate and LFSR ----------------------------------------------------
        m.d.comb += [upd.mant.eq(self.mant), upd.exp.eq(self.exp), upd.seed.eq(self.seed),
                     upd.seed_load.eq(self.seed_load), self.lfsr.eq(upd.lfsr)]

        # --- predictions and counters --------------------------------------------------
        g_last = loss.o_stream.valid & loss.o_stream.ready & loss.o_stream.payload.last
        m.d.sync += self.pred_valid.eq(g_last)
        with m.If(g_last):
            m.d.sync += [self.pred.eq(loss.o_stream.payload.pred),
                         self.correct.eq(loss.o_stream.payload.correct)]
        sample_cycle = ad.busy | (ad.i_stream.valid & ad.i_stream.ready)
        updating = Signal()
        with m.If(self.clear_counters):
            m.d.sync += [self.n_samples.eq(0), self.n_correct.eq(0),
                         self.fwd_cycles.eq(0), self.upd_cycles.eq(0)]
        with m.Else():
            with m.If(g_last):
                m.d.sync += [self.n_samples.eq(self.n_samples + 1),
                             self.n_correct.eq(self.n_correct + loss.o_stream.payload.correct)]
            with m.If(sample_cycle):
                m.d.sync += self.fwd_cycles.eq(self.fwd_cycles + 1)
            with m.If(updating):
                m.d.sync += self.upd_cycles.eq(self.upd_cycles + 1)

        # --- the update walk -------------------------------------------------------------
        # The rows and columns left count down to zero and the last layer is a flag, so
        # that the walk's next address hangs off zero tests, not off the layer table's
        # multiplexer and compares.
        lbits = range(cfg.max_layers + 1)
        l = Signal(lbits)
        l_last = Signal()                               # l == n_layers - 1
        isb = Signal()
        row_left = Signal(range(max(cfg.max_adapter_in, cfg.max_rank) + 1))
        col_left = Signal(range(max(cfg.max_rank, cfg.max_classes) + 1))
        rptr = Signal(self._aw)
        fs = self.setup.fshift[l]
        row_end = row_left == 0
        col_end = col_left == 0
        last_w = isb & l_last & row_end & col_end

        # stage 2: the words read two cycles before enter the update unit (the adapter's
        # port takes two cycles; the moments' words are registered to match, which also
        # keeps their block RAM's output off the update unit's first stage)
        v1, last1, v2, last2 = Signal(), Signal(), Signal(), Signal()
        fs1, fs2 = Signal(signed(FSHIFT_BITS)), Signal(signed(FSHIFT_BITS))
        m2, v2_word = read_register(m, mr, "m2"), read_register(m, vr, "v2_word")
        m.d.sync += [v2.eq(v1), last2.eq(last1), fs2.eq(fs1)]
        ui = upd.i_stream
        m.d.comb += [
            ui.valid.eq(v2),
            ui.payload.w.eq(ad.mem_rmaster),
            ui.payload.m.eq(m2),
            ui.payload.v.eq(v2_word),
            ui.payload.d.eq(ad.mem_rgrad),          # sign-extended to DW_BITS
            ui.payload.fshift.eq(fs2),
            ui.payload.last.eq(last2),
        ]
        # the output is never stalled, so ui.ready is always high
        uo = upd.o_stream
        m.d.comb += [uo.ready.eq(1), mr.addr.eq(rptr), vr.addr.eq(rptr)]

        # the ADAPTERS layout (firmware.memmap.adapter_bases): after a row of B_l or the
        # last row of A_l, the next multiple of P; after any other row of A_l, the next
        # multiple of R
        P, LP = cfg.adapter_lanes, ceil_log2(cfg.adapter_lanes)
        rmask = Signal(max(1, LP))
        m.d.sync += rmask.eq(row_mask(rank, max(1, LP)))
        next_line = next_multiple(rptr, P - 1)
        next_row = next_multiple(rptr, rmask)
        # each result is written where its weight was read, LATENCY + 2 cycles earlier
        wq = [Signal(self._aw, name=f"wq{i}") for i in range(LATENCY + 2)]
        m.d.sync += [wq[0].eq(rptr)] + [wq[i].eq(wq[i - 1]) for i in range(1, LATENCY + 2)]
        wptr = wq[-1]

        upd_pending = Signal()
        reset_pending = Signal()
        sweep = Signal(self._aw + 1)
        issue = Signal()
        m.d.sync += [v1.eq(issue), last1.eq(last_w), fs1.eq(Mux(isb, fs.b, fs.a))]

        with m.FSM(name="lora") as fsm:
            with m.State("IDLE"):
                with m.If(reset_pending):
                    m.d.sync += sweep.eq(0)
                    m.next = "MRESET"
                with m.Elif(upd_pending & ~ad.busy):
                    m.d.sync += [l.eq(0), l_last.eq(n_layers == 1), isb.eq(0),
                                 row_left.eq(setup.layers[0].size - 1), col_left.eq(rank - 1),
                                 rptr.eq(0)]
                    with m.If(n_layers == 0):
                        m.d.sync += upd_pending.eq(0)
                    with m.Else():
                        m.next = "READ"
            with m.State("MRESET"):
                m.d.sync += sweep.eq(sweep + 1)
                with m.If(sweep == cfg.adapter_words - 1):
                    m.d.sync += reset_pending.eq(0)
                    m.next = "IDLE"
            with m.State("READ"):
                with m.If(~col_end):
                    m.d.sync += rptr.eq(rptr + 1)
                with m.Elif(isb | row_end):
                    m.d.sync += rptr.eq(next_line)
                with m.Else():
                    m.d.sync += rptr.eq(next_row)
                with m.If(col_end):
                    with m.If(row_end):
                        with m.If(isb):
                            # A of the next layer: its inputs' rows of rank columns
                            m.d.sync += [isb.eq(0), l.eq(l + 1), l_last.eq(l + 2 == n_layers),
                                         row_left.eq(setup.layers[l + 1].size - 1),
                                         col_left.eq(rank - 1)]
                        with m.Else():
                            # B of this layer: rank rows of a column per class
                            m.d.sync += [isb.eq(1), row_left.eq(rank - 1),
                                         col_left.eq(classes - 1)]
                    with m.Else():
                        m.d.sync += [row_left.eq(row_left - 1),
                                     col_left.eq(Mux(isb, classes, rank) - 1)]
                with m.Else():
                    m.d.sync += col_left.eq(col_left - 1)
                with m.If(last_w):
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(uo.valid & uo.payload.last):
                    m.d.sync += upd_pending.eq(0)
                    m.next = "IDLE"

        # from the state register, outside the FSM's case blocks (Icarus leaves a
        # combinational block X until one of its inputs changes)
        resetting = fsm.ongoing("MRESET")
        m.d.comb += [issue.eq(fsm.ongoing("READ")),
                     updating.eq(fsm.ongoing("READ") | fsm.ongoing("DRAIN"))]
        # write-back of every result (READ and DRAIN), or the moment reset's zeros
        m.d.comb += [
            mw.addr.eq(Mux(resetting, sweep, wptr)), mw.data.eq(Mux(resetting, 0, uo.payload.m)),
            vw.addr.eq(Mux(resetting, sweep, wptr)), vw.data.eq(Mux(resetting, 0, uo.payload.v)),
            mw.en.eq(resetting | uo.valid), vw.en.eq(resetting | uo.valid),
        ]

        # --- the adapter's memory port: the update's, or passed through ----------------
        with m.If(updating):
            m.d.comb += [
                ad.mem_addr.eq(rptr),
                ad.mem_re.eq(issue),
                ad.mem_clr.eq(issue),
                ad.mem_we.eq(uo.valid),
                ad.mem_waddr.eq(wptr),
                ad.mem_wdata.eq(uo.payload.w),
            ]
        with m.Else():
            m.d.comb += [
                ad.mem_addr.eq(self.mem_addr),
                ad.mem_re.eq(self.mem_re),
                ad.mem_clr.eq(self.mem_clr),
                ad.mem_we.eq(self.mem_we),
                ad.mem_waddr.eq(self.mem_addr),
                ad.mem_wdata.eq(self.mem_wdata),
            ]
        m.d.comb += [self.mem_rmaster.eq(ad.mem_rmaster), self.mem_rgrad.eq(ad.mem_rgrad)]

        with m.If(self.update):
            m.d.sync += upd_pending.eq(1)
        with m.If(self.reset_moments):
            m.d.sync += reset_pending.eq(1)

        # no new sample once an update is due and the adapter is idle, nor during one
        m.d.comb += hold.eq(updating | (upd_pending & ~ad.busy))
        m.d.comb += self.busy.eq(ad.busy | upd_pending | reset_pending
                                 | ~fsm.ongoing("IDLE"))
        return m
