"""The platform-independent accelerator: every unit, its memories and the host port.

# Ref: docs/isa.md (programs, host port); firmware/memmap.py (the address map).
"""

from amaranth import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from firmware.isa import Error, Phase
from firmware.memmap import (ID_MAGIC, OFFSET_BITS, PORT_ADDR_BITS, Control, Region, Regs,
                             chunk_bits, word_bits)

from .cache import ActivationCache
from .config import DEFAULT, AccelConfig
from .gather import GatherUnit
from .layer_engine import MEM_ACT, MEM_BIAS, MEM_LOGIT, MEM_WEIGHT, LayerEngine
from .layouts import class_bits, sample_layout
from .lora import LoraEngine
from .ram import read_register
from .segmented import SegmentedRAM
from .sequencer import Sequencer
from .skid import SkidBuffer

__all__ = ["Accelerator", "host_port"]

RESULT_BITS = 9            # prediction | correct << 8


def host_port():
    """The members of the internal host port (`Accelerator` describes them)."""
    return {
        "addr": In(PORT_ADDR_BITS), "wdata": In(32), "we": In(1), "re": In(1),
        "rdata": Out(32), "rvalid": Out(1),
    }


class Accelerator(wiring.Component):
    """The device: sequencer, layer engine, gather unit, activation cache and LoRA engine,
    with the program, sample, label and result memories.

    Members
    -------
    addr, wdata, we, re, rdata, rvalid
        The host port (`firmware.memmap`). ``we`` writes ``wdata`` at ``addr`` in that
        cycle (a CONTROL write reaches the sequencer in the next); ``re`` reads ``addr``,
        whose word is on ``rdata`` with ``rvalid`` high 3 cycles later. One access per
        cycle, never stalled. While a program runs only REGS is served (other reads give
        0, writes are dropped, both set REFUSED).
    running, done, error : Out(1)
        For status LEDs.

    The cycle counters (REGS) count while a program runs: every cycle, the cycles of the
    current phase, and the cycles the layer engine is busy.
    """

    def __init__(self, cfg=DEFAULT):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        self._cfg = cfg
        super().__init__({**host_port(), "running": Out(1), "done": Out(1), "error": Out(1)})

    def elaborate(self, platform):
        cfg = self._cfg
        C = cfg.array_cols
        m = Module()
        m.submodules.seq = seq = Sequencer(cfg)
        m.submodules.engine = engine = LayerEngine(cfg)
        m.submodules.gather = gather = GatherUnit(cfg)
        m.submodules.cache = cache = ActivationCache(cfg)
        m.submodules.lora = lora = LoraEngine(cfg)
        # register slices on the streams that cross the chip: the LoRA engine is fed from
        # two units, and loads fan out to every row's activation buffer and hold the conv
        # unit's pipeline; the slices keep the producers' handshakes and the host decode
        # out of the consumers' timing paths
        m.submodules.lora_in = lora_in = SkidBuffer(sample_layout(cfg))
        m.submodules.engine_in = engine_in = SkidBuffer(engine.load.payload.shape())
        wiring.connect(m, lora_in.o, lora.i_stream)
        wiring.connect(m, engine_in.o, engine.load)

        running = seq.running
        region = Signal(Region)
        offset = Signal(OFFSET_BITS)
        m.d.comb += [region.eq(self.addr[OFFSET_BITS:]), offset.eq(self.addr[:OFFSET_BITS]),
                     self.running.eq(running), self.done.eq(seq.done),
                     self.error.eq(seq.error != Error.NONE)]
        host_we = self.we & ~running
        host_re = self.re & ~running
        refused = Signal()
        with m.If((self.we | self.re) & running & (region != Region.REGS)):
            m.d.sync += refused.eq(1)

        # --- memories of the top level --------------------------------------------------
        def memory(name, width, depth):
            mem = Memory(shape=unsigned(width), depth=depth, init=[])
            m.submodules[name] = mem
            return mem.write_port(), mem.read_port()

        prog_w, prog_r = memory("program", 32, cfg.program_words)
        lab_w, lab_r = memory("labels", class_bits(cfg), cfg.max_samples)
        res_w, res_r = memory("results", RESULT_BITS, cfg.max_samples)
        for port, reg in ((prog_w, Region.PROGRAM), (lab_w, Region.LABELS)):
            m.d.comb += [port.addr.eq(offset), port.data.eq(self.wdata),
                         port.en.eq(host_we & (region == reg))]
        # the samples fill most of the block RAM: its read takes three cycles
        m.submodules.samples = smp = SegmentedRAM(32, cfg.sample_words // 4)
        m.d.comb += [smp.w_addr.eq(offset), smp.w_data.eq(self.wdata),
                     smp.w_en.eq(host_we & (region == Region.SAMPLES))]
        m.d.comb += [
            prog_r.addr.eq(Mux(running, seq.prog_addr, offset)), seq.prog_data.eq(prog_r.data),
            smp.r_addr.eq(Mux(running, gather.smp_addr, offset)), gather.smp_data.eq(smp.r_data),
            lab_r.addr.eq(Mux(running, seq.index, offset)),
            res_r.addr.eq(offset),
        ]

        # --- sequencer and units ---------------------------------------------------------
        m.d.comb += [
            engine.desc.eq(seq.desc), engine.start.eq(seq.layer_start),
            seq.layer_busy.eq(engine.busy),
            gather.setup.eq(seq.gather), gather.fmt.eq(seq.cache),
            gather.move.eq(seq.move), gather.src.eq(seq.move_src),
            gather.gather.eq(seq.gather_start), gather.to_lora.eq(seq.gather_lora),
            gather.to_fill.eq(seq.gather_fill), gather.index.eq(seq.index),
            gather.label.eq(lab_r.data),
            seq.gather_busy.eq(gather.busy | engine_in.busy),
            cache.setup.eq(seq.cache), cache.invalidate.eq(seq.invalidate),
            cache.clear_counters.eq(seq.clear_counters),
            lora.setup.eq(seq.adapter), lora.mant.eq(seq.lr.mant), lora.exp.eq(seq.lr.exp),
            lora.seed.eq(seq.seed.seed), lora.seed_load.eq(seq.seed_load),
            lora.update.eq(seq.update), lora.reset_moments.eq(seq.reset_moments),
            lora.clear_grads.eq(seq.clear_grads), lora.clear_counters.eq(seq.clear_counters),
            seq.cache_error.eq(cache.fill_error),
        ]
        wiring.connect(m, gather.fill, cache.fill)

        # LOOKUP: the request, then its answer; a hit streams to the LoRA engine with the
        # label of the index it asked for (the program moves on to the next index).
        reading = Signal()
        read_label = Signal(class_bits(cfg))
        rd = cache.read
        m.d.comb += [cache.req.valid.eq(seq.lookup), cache.req.payload.index.eq(seq.index),
                     cache.req.payload.count.eq(1), seq.lookup_ready.eq(cache.req.ready),
                     seq.answer.eq(reading & rd.valid & rd.payload.first),
                     seq.answer_hit.eq(rd.payload.hit), seq.reader_busy.eq(reading)]
        with m.If(cache.req.valid & cache.req.ready):
            m.d.sync += [reading.eq(1), read_label.eq(lab_r.data)]
        with m.If(rd.valid & rd.ready & rd.payload.last):
            m.d.sync += reading.eq(0)

        src = lora_in.i
        with m.If(reading):
            m.d.comb += [src.valid.eq(rd.valid & rd.payload.hit),
                         rd.ready.eq(Mux(rd.payload.hit, src.ready, 1)),
                         src.payload.data.eq(rd.payload.data), src.payload.label.eq(read_label),
                         src.payload.first.eq(rd.payload.first), src.payload.last.eq(rd.payload.last)]
        with m.Else():
            m.d.comb += [src.valid.eq(gather.lora.valid), gather.lora.ready.eq(src.ready),
                         src.payload.eq(gather.lora.payload)]

        units_busy = (engine.busy | engine_in.busy | gather.busy | reading | lora_in.busy | lora.busy
                      | cache.busy)
        m.d.comb += seq.units_busy.eq(units_busy)

        # --- counters ----------------------------------------------------------------------
        counters = {r: Signal(32, name=r.name.lower()) for r in
                    (Regs.CYCLES, Regs.CYCLES_FROZEN, Regs.CYCLES_CACHED, Regs.CYCLES_INFER,
                     Regs.LAYER_CYCLES)}
        counting = {Regs.CYCLES: running,
                    Regs.CYCLES_FROZEN: running & (seq.phase == Phase.FROZEN),
                    Regs.CYCLES_CACHED: running & (seq.phase == Phase.CACHED),
                    Regs.CYCLES_INFER: running & (seq.phase == Phase.INFER),
                    Regs.LAYER_CYCLES: running & engine.busy}
        result_ptr = Signal(range(cfg.max_samples + 1))
        with m.If(seq.clear_counters):
            m.d.sync += [c.eq(0) for c in counters.values()]
            m.d.sync += result_ptr.eq(0)
        with m.Else():
            for r, c in counters.items():
                with m.If(counting[r]):
                    m.d.sync += c.eq(c + 1)
            with m.If(lora.pred_valid & (result_ptr < cfg.max_samples)):
                m.d.sync += result_ptr.eq(result_ptr + 1)
        m.d.comb += [res_w.addr.eq(result_ptr), res_w.data.eq(Cat(lora.pred, Const(0, 8 - class_bits(cfg)), lora.correct)),
                     res_w.en.eq(lora.pred_valid & (result_ptr < cfg.max_samples))]

        # --- host writes -------------------------------------------------------------------
        # a CONTROL write reaches the sequencer a cycle later, so that the host's address
        # decode lies on no path into its state
        start, abort, entry = Signal(), Signal(), Signal.like(seq.entry)
        m.d.sync += [start.eq(0), abort.eq(0)]
        m.d.comb += [seq.start.eq(start), seq.abort.eq(abort), seq.entry.eq(entry)]
        with m.If(self.we & (region == Region.REGS) & (offset == Regs.CONTROL)):
            m.d.sync += [start.eq(self.wdata[0] & ~running), abort.eq(self.wdata[1]),
                         entry.eq(self.wdata[16:])]
            with m.If(self.wdata[0] & ~running):
                m.d.sync += refused.eq(0)

        # wide words: chunks are staged, the last one commits the word to the layer engine
        staging = Signal(32 * C)
        load = engine_in.i
        with m.If(running):
            m.d.comb += [load.valid.eq(gather.load.valid), load.payload.eq(gather.load.payload),
                         gather.load.ready.eq(load.ready)]
        for reg, mem_id in ((Region.WEIGHTS, MEM_WEIGHT), (Region.BIASES, MEM_BIAS),
                            (Region.ACT, MEM_ACT)):
            n = -(-word_bits(reg, cfg) // 32)
            cb = chunk_bits(reg, cfg)
            chunk, word = offset[:cb], offset[cb:]
            with m.If(host_we & (region == reg)):
                with m.If(chunk == n - 1):
                    m.d.comb += [load.valid.eq(1), load.payload.mem.eq(mem_id),
                                 load.payload.addr.eq(word),
                                 load.payload.data.eq(Cat(staging[:32 * (n - 1)], self.wdata))]
                with m.Elif(chunk < n - 1):
                    m.d.sync += staging.word_select(chunk, 32).eq(self.wdata)

        ad = lora
        m.d.comb += [ad.mem_addr.eq(offset), ad.mem_wdata.eq(self.wdata),
                     ad.mem_we.eq(host_we & (region == Region.ADAPTERS)),
                     ad.mem_re.eq(host_re & (region == Region.ADAPTERS))]

        # --- host reads: the word is on rdata 3 cycles after re ----------------------------
        # cycle 1: the memories' words and the registers' go straight into registers (a
        # deep memory's output multiplexer is slow); cycle 2: each region's word into a
        # register; cycle 3: the region's word is chosen
        rd_region = Signal(Region)
        rd_chunk = Signal(OFFSET_BITS)
        rd_reg = Signal(32)
        rd_refused = Signal()
        rd_valid = Signal()
        m.d.sync += [rd_valid.eq(self.re), rd_region.eq(region), rd_chunk.eq(offset),
                     rd_refused.eq(running & (region != Region.REGS))]
        with m.If(~running):
            m.d.comb += [engine.rd_mem.eq(Mux(region == Region.LOGITS, MEM_LOGIT, MEM_ACT)),
                         engine.rd_addr.eq(offset >> Mux(region == Region.LOGITS,
                                                         chunk_bits(Region.LOGITS, cfg),
                                                         chunk_bits(Region.ACT, cfg)))]
        with m.Else():
            m.d.comb += [engine.rd_mem.eq(gather.rd_mem), engine.rd_addr.eq(gather.rd_addr)]
        m.d.comb += gather.rd_data.eq(engine.rd_data)

        regs = {
            Regs.ID: ID_MAGIC, Regs.CONFIG_HASH: cfg.hash,
            Regs.GEOMETRY: (cfg.array_rows | cfg.array_cols << 8 | cfg.max_classes << 16
                            | cfg.max_layers << 24),
            Regs.STATUS: Cat(running, seq.done, seq.error != Error.NONE, refused,
                             Const(0, 4), seq.error, seq.phase),
            Regs.PC: seq.pc, Regs.INDEX: seq.index, Regs.UPDATES: seq.updates,
            Regs.LORA_FWD: lora.fwd_cycles, Regs.LORA_UPD: lora.upd_cycles,
            Regs.SAMPLES: lora.n_samples, Regs.CORRECT: lora.n_correct,
            Regs.CACHE_HITS: cache.hits, Regs.CACHE_MISSES: cache.misses, Regs.LFSR: lora.lfsr,
            **counters,
        }
        # the registers come from all over the chip: in cycle 1 each group of four gives
        # its word into a register, in cycle 2 the group's word is chosen
        n_groups = -(-(max(regs) + 1) // 4)
        rd_groups = [Signal(32, name=f"rd_regs{g}") for g in range(n_groups)]
        for g, group in enumerate(rd_groups):
            m.d.sync += group.eq(0)
            with m.Switch(rd_chunk[:2]):
                for r, value in regs.items():
                    if r // 4 == g:
                        with m.Case(r % 4):
                            m.d.sync += group.eq(value)
        rd2_chunk = Signal(OFFSET_BITS)
        m.d.sync += rd2_chunk.eq(rd_chunk)
        with m.Switch(rd2_chunk[2:]):
            for g, group in enumerate(rd_groups):
                with m.Case(g):
                    m.d.comb += rd_reg.eq(group)

        act8 = Signal(8 * C)
        for j in range(C):
            m.d.comb += act8.word_select(j, 8).eq(engine.rd_data.word_select(j, 16)[:8])
        ports = {Region.PROGRAM: prog_r, Region.LABELS: lab_r, Region.RESULTS: res_r}
        held = {r: read_register(m, port, f"rd_{r.name.lower()}") for r, port in ports.items()}
        # the registers, the adapters' port and the layer engine have registered their
        # words in cycle 1 themselves, and choose one in cycle 2 (group, bank, memory and
        # chunk)
        held[Region.REGS] = rd_reg
        held[Region.ADAPTERS] = ad.mem_rmaster
        held[Region.ACT] = _chunk(act8, rd2_chunk, chunk_bits(Region.ACT, cfg))
        held[Region.LOGITS] = _chunk(engine.rd_data, rd2_chunk, chunk_bits(Region.LOGITS, cfg))
        held2 = {r: Signal(32, name=f"rd2_{r.name.lower()}") for r in held}
        m.d.sync += [held2[r].eq(w) for r, w in held.items()]
        # the samples' word has passed its memory's registers and segment multiplexer
        assert SegmentedRAM.LATENCY == 3
        held2[Region.SAMPLES] = smp.r_data
        rd2_valid, rd2_region, rd2_refused = Signal(), Signal(Region), Signal()
        rd3_region, rd3_refused = Signal(Region), Signal()
        m.d.sync += [rd2_valid.eq(rd_valid), rd2_region.eq(rd_region), rd2_refused.eq(rd_refused),
                     self.rvalid.eq(rd2_valid), rd3_region.eq(rd2_region),
                     rd3_refused.eq(rd2_refused)]
        with m.If(self.rvalid & ~rd3_refused):
            with m.Switch(rd3_region):
                for r, word in held2.items():
                    with m.Case(r):
                        m.d.comb += self.rdata.eq(word)
        return m


def _chunk(value, offset, bits):
    """The 32-bit chunk of ``value`` that the low ``bits`` of ``offset`` select."""
    if bits == 0:
        return value[:32]
    return Cat(value, Const(0, 32)).word_select(offset[:bits], 32)
