"""Sequencer (gateware/sequencer.py) in Amaranth's simulator, with the units it drives
emulated by the testbench: every unit goes busy for a while after its strobe, and the
cache answers lookups from a list. The events it issues are checked against what
docs/isa.md says the program does; the error paths stop with their code."""

import random

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from firmware.isa import (CONV_WORDS, LOOP_DEPTH, Error, Phase, Reg, encode, lr_layout, pack,
                          register_layout)
from gateware.config import AccelConfig
from gateware.sequencer import Sequencer

CFG = AccelConfig(program_words=128, max_samples=64, sample_words=4096)


class Bench(wiring.Component):
    """The sequencer with its program memory (the top level's arrangement)."""

    def __init__(self, words, cfg):
        self._words, self._cfg = words, cfg
        self.seq = Sequencer(cfg)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.seq = seq = self.seq
        m.submodules.prog = prog = Memory(shape=32, depth=self._cfg.program_words,
                                          init=self._words)
        rd = prog.read_port()
        m.d.comb += [rd.addr.eq(seq.prog_addr), seq.prog_data.eq(rd.data)]
        return m


def run(words, hits=(), busy=(3, 9), max_cycles=20000, seed=1, abort_at=None):
    """Run ``words`` from pc 0. Returns (events, final state): events are (name, index)
    per strobe in issue order; units stay busy a random number of cycles in ``busy``."""
    bench = Bench(words, CFG)
    seq = bench.seq
    rng = random.Random(seed)
    events, state = [], {}
    hits = list(hits)

    async def units(ctx):
        layer = gather = reader = other = 0
        answer_in = None
        async for clk_edge, rst, *vals in ctx.tick().sample(
                seq.layer_start, seq.move, seq.gather_start, seq.lookup, seq.update,
                seq.clear_grads, seq.reset_moments, seq.seed_load, seq.invalidate,
                seq.clear_counters, seq.index, seq.gather_lora, seq.gather_fill, seq.move_src):
            (layer_start, move, gstart, lookup, update, cg, rm, sl, inv, cc, index, glora,
             gfill, src) = vals
            for name, v in (("layer", layer_start), ("move", move), ("update", update),
                            ("clear_grads", cg), ("reset_moments", rm), ("seed_load", sl),
                            ("invalidate", inv), ("clear_counters", cc)):
                if v:
                    events.append((name, index if name != "move" else src))
            if gstart:
                events.append((f"gather{'L' if glora else ''}{'F' if gfill else ''}", index))
            if layer_start:
                layer = rng.randint(*busy)
            if move or gstart:
                gather = rng.randint(*busy)
            if update or cg or rm or inv:
                other = rng.randint(*busy)
            if lookup:
                events.append(("lookup", index))
                answer_in = 2
            layer, gather, other = max(layer - 1, 0), max(gather - 1, 0), max(other - 1, 0)
            answer = hit = 0
            if answer_in is not None:
                answer_in -= 1
                if answer_in == 0:
                    answer, hit, answer_in = 1, hits.pop(0), None
                    reader = rng.randint(*busy) if hit else 0
            reader = max(reader - 1, 0)
            ctx.set(seq.layer_busy, layer > 0)
            ctx.set(seq.gather_busy, gather > 0)
            ctx.set(seq.reader_busy, reader > 0)
            ctx.set(seq.answer, answer)
            ctx.set(seq.answer_hit, hit)
            ctx.set(seq.units_busy, (layer | gather | reader | other) > 0)

    async def bench_main(ctx):
        ctx.set(seq.lookup_ready, 1)
        ctx.set(seq.entry, 0)
        ctx.set(seq.start, 1)
        await ctx.tick()
        ctx.set(seq.start, 0)
        for cycle in range(max_cycles):
            if abort_at is not None and cycle == abort_at:
                ctx.set(seq.abort, 1)
            await ctx.tick()
            ctx.set(seq.abort, 0)
            if not ctx.get(seq.running):
                break
        else:
            raise AssertionError("the program did not stop")
        for name in ("done", "error", "pc", "index", "phase", "updates"):
            state[name] = ctx.get(getattr(seq, name))
        state["lr"] = ctx.get(seq.lr.mant), ctx.get(seq.lr.exp)
        state["seed"] = ctx.get(seq.seed.seed)
        state["desc_in_base"] = ctx.get(seq.desc.in_base)
        state["cycles"] = cycle

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(units, background=True)
    sim.add_testbench(bench_main)
    sim.run()
    return events, state


def program(lines, data=()):
    """Words of ``lines`` ((op, fields) pairs) followed by ``data`` words."""
    return [encode(op, **fields) for op, fields in lines] + list(data)


def test_nested_loops_lookups_and_layers():
    # two epochs of 3 samples in batches of 2: the cache-on sample body of docs/isa.md
    n_code = 17
    desc_addr = n_code
    lr_addr = desc_addr + CONV_WORDS
    body = [("LOOKUP", {}), ("BRANCH", {"target": 0, "cond": "hit"}),  # target patched below
            ("MOVE", {"stride": 5}), ("LAYER", {"addr": desc_addr}), ("GATHER", {"lora": 1, "fill": 1})]
    lines = [("LOAD", {"addr": lr_addr, "reg": "lr"}),
             ("CLEAR", {"grads": 1, "moments": 1, "seed": 1, "cache": 1, "counters": 1}),
             ("PHASE", {"phase": "cached"}),
             ("LOOP", {"count": 2}),
             ("SETIDX", {"index": 4}),
             ("LOOP", {"count": 3}),
             *body,
             ("INCIDX", {}),
             ("ENDLOOP", {}),
             ("UPDATE", {}),
             ("ENDLOOP", {}),
             ("PHASE", {"phase": "none"}),
             ("HALT", {})]
    assert len(lines) == n_code
    target = [i for i, (op, _) in enumerate(lines) if op == "INCIDX"][0]
    lines[7] = ("BRANCH", {"target": target, "cond": "hit"})
    desc = [0] * CONV_WORDS
    desc[-1] = 0xDEADBEEF          # lands in the descriptor's top word
    lr = pack(lr_layout(CFG), {"mant": 0xABCD, "exp": -5})
    hits = [False, True, False, True, True, False]
    events, state = run(program(lines, desc + lr), hits=hits)
    expected = [("clear_grads", 0), ("reset_moments", 0), ("seed_load", 0), ("invalidate", 0),
                ("clear_counters", 0)]
    it = iter(hits)
    for _ in range(2):
        for index in (4, 5, 6):
            expected.append(("lookup", index))
            if not next(it):
                expected += [("move", index * 5), ("layer", index), ("gatherLF", index)]
        expected.append(("update", 7))
    assert events == expected
    assert state["done"] == 1 and state["error"] == Error.NONE
    assert state["updates"] == 2 and state["index"] == 7 and state["phase"] == Phase.NONE
    assert state["lr"] == (0xABCD, -5)


def test_gather_destinations_and_registers():
    seed = pack(register_layout(Reg.SEED, CFG), {"seed": 0x12345678})
    lines = [("LOAD", {"addr": 6, "reg": "seed"}),
             ("SETIDX", {"index": 9}),
             ("GATHER", {"lora": 1, "fill": 0}),
             ("GATHER", {"lora": 0, "fill": 1}),
             ("BRANCH", {"target": 5, "cond": "always"}),
             ("HALT", {})]
    events, state = run(program(lines, seed))
    assert events == [("gatherL", 9), ("gatherF", 9)]
    assert state["seed"] == 0x12345678 and state["done"] == 1


@pytest.mark.parametrize("lines,data,code", [
    ([("SYNC", {})], [31 << 27], Error.OPCODE),                     # undefined opcode
    ([("SYNC", {})], [encode("SYNC") | 1], Error.OPCODE),           # unused bits set
    ([], [encode("LOAD", addr=0, reg=0) | 7 << 16], Error.OPCODE),  # undefined register
    ([], [encode("BRANCH", target=3, cond=0) | 3 << 16], Error.OPCODE),  # undefined condition
    ([("BRANCH", {"target": 1000, "cond": "always"})], [], Error.PC),
    ([("LAYER", {"addr": 125})], [], Error.PC),                     # descriptor past the end
    ([("LOOP", {"count": 0})], [], Error.LOOP),
    ([("ENDLOOP", {})], [], Error.LOOP),
    ([("LOOP", {"count": 1})] * (LOOP_DEPTH + 1), [], Error.LOOP),
    ([("SETIDX", {"index": 64}), ("LOOKUP", {})], [], Error.INDEX),
    ([("SETIDX", {"index": 64}), ("GATHER", {"lora": 1, "fill": 0})], [], Error.INDEX),
    ([("SETIDX", {"index": 40}), ("MOVE", {"stride": 100})], [], Error.INDEX),
])
def test_errors_stop_the_program(lines, data, code):
    words = program(lines, data) + [encode("HALT")]
    events, state = run(words)
    assert state["error"] == code and state["done"] == 0
    assert not any(name in ("layer", "move", "gatherL", "update") for name, _ in events)


def test_abort_stops_a_loop():
    lines = [("LOOP", {"count": 1000}), ("SYNC", {}), ("ENDLOOP", {}), ("HALT", {})]
    events, state = run(program(lines), abort_at=50)
    assert state["done"] == 0 and state["error"] == Error.NONE and state["cycles"] <= 52
