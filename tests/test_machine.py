"""The instruction-level model (sim.machine) running compiled programs (firmware.compiler)
through the host port, bit-exact against the golden fine-tune (sim.finetune); the
programs' shape (docs/isa.md); the port; the error stops."""

import math

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from firmware.asm import Assembler, disassemble
from firmware.compiler import (adapter_count, compile_finetune, compile_infer, finetune_images,
                               frozen_images, image_writes, infer_images, master_words,
                               plan_activations, read_masters)
from firmware.isa import Error, Opcode, Phase, Reg, decode, encode
from firmware.layers import LayoutError, pack_biases, pack_weights
from firmware.memmap import (ID_MAGIC, Control, Region, Regs, Status, adapter_addresses,
                             adapter_bases, adapter_span, address)
from gateware.config import DEFAULT as CFG
from sim.finetune import (ScheduleError, Schedule, adapters_sha256, batch_order, finetune_fixed,
                          init_adapters)
from sim.fixed_model import adapter_forward, argmax, frozen_forward, quantize_input
from sim.machine import Machine
from tests.test_finetune import digits, fan  # noqa: F401 (the workloads' fixtures)


def load(machine, program, images):
    for a, w in image_writes({Region.PROGRAM: [(0, program.words)]}) + image_writes(images):
        machine.write(a, w)


def read_words(machine, region, n, offset=0):
    return [machine.read(address(region, offset + i, machine.cfg)) for i in range(n)]


def reg(machine, r):
    return machine.read(address(Region.REGS, r, machine.cfg))


def finetune(model, x, y, schedule, cfg=CFG):
    """Compile, load, run through the port; returns (machine, program, masters)."""
    machine = Machine(cfg)
    program = compile_finetune(model, schedule, cfg, len(y))
    load(machine, program, finetune_images(model, x, y, schedule, cfg))
    machine.write(address(Region.REGS, Regs.CONTROL, cfg), Control.START | program.entry << 16)
    assert reg(machine, Regs.STATUS) & 0xFF == Status.DONE, hex(reg(machine, Regs.STATUS))
    words = read_words(machine, Region.ADAPTERS, adapter_count(model, schedule.rank, cfg))
    return machine, program, read_masters(words, model, schedule.rank, cfg)


def check_against_golden(model, x, y, schedule, cfg=CFG):
    machine, program, masters = finetune(model, x, y, schedule, cfg)
    ref = finetune_fixed(model, x, y, schedule, cfg)
    for (a, b), (ra, rb) in zip(masters, ref.masters):
        assert_array_equal(a, ra)
        assert_array_equal(b, rb)
    assert adapters_sha256(masters) == adapters_sha256(ref.masters)
    assert any(np.abs(b).max() > 0 for _, b in masters)          # they learned
    assert reg(machine, Regs.CACHE_HITS) == ref.cache_hits
    assert reg(machine, Regs.CACHE_MISSES) == ref.cache_misses
    n = len(y)
    assert reg(machine, Regs.UPDATES) == program.updates == schedule.epochs * math.ceil(n / schedule.batch)
    assert reg(machine, Regs.SAMPLES) == schedule.epochs * n
    # the last epoch's predictions, one per sample, in RESULTS (the pointer stops at max_samples)
    results = read_words(machine, Region.RESULTS, min(n, cfg.max_samples))
    assert all(r >> 9 == 0 and (r & 0xFF) < model.classes for r in results)
    return machine, program, masters


@pytest.mark.parametrize("cache, bits, cache_samples", [
    (True, 8, None),        # (a) cache on, 8-bit
    (False, 8, None),       # (b) cache off
    (True, 4, None),        # (c) 4-bit cache
    (True, 8, 100),         # (d) overflow: samples past 100 recomputed every epoch
])
def test_finetune_matches_golden(digits, cache, bits, cache_samples):
    """digits rotate:30, 3 epochs, batch 20 over 359 samples (17 full batches and one of
    19): the adapters bit-identical to finetune_fixed, the cache counters too."""
    wl, model = digits
    t = wl.target_train
    cfg = CFG if cache_samples is None else CFG.replace(cache_samples=cache_samples)
    schedule = Schedule(epochs=3, batch=20, cache=cache, cache_bits=bits)
    machine, _, _ = check_against_golden(model, t.x, t.y, schedule, cfg)
    n = len(t.y)
    if cache:
        held = min(n, cfg.cache_samples)
        assert reg(machine, Regs.CACHE_HITS) == 2 * held
        assert reg(machine, Regs.CACHE_MISSES) == 3 * n - 2 * held


@pytest.mark.parametrize("n, batch, epochs", [(340, 20, 2), (15, 20, 1), (7, 1, 2)])
def test_batches_that_divide_or_exceed_the_samples(digits, n, batch, epochs):
    wl, model = digits
    t = wl.target_train
    check_against_golden(model, t.x[:n], t.y[:n], Schedule(epochs=epochs, batch=batch, rank=2, seed=5))


def test_fan(fan):
    """(f) fan env:noisy, one schedule. Its 423 samples of 256 bytes need a sample memory
    above the default 64 KiB."""
    wl, model = fan
    t = wl.target_train
    need = len(t.y) * model.adapter_inputs[0]
    if need > CFG.sample_words:
        with pytest.raises(ScheduleError, match="exceed the sample memory"):
            compile_finetune(model, Schedule(), CFG, len(t.y))
    cfg = CFG.replace(sample_words=max(CFG.sample_words, 1 << (need - 1).bit_length()))
    check_against_golden(model, t.x, t.y, Schedule(epochs=3, batch=16, rank=4, cache_bits=4, seed=2), cfg)


def test_infer_matches_golden(digits):
    """(g) the infer program after a fine-tune on the same machine: RESULTS hold the
    golden adapter forward's argmax, CORRECT / SAMPLES its accuracy."""
    wl, model = digits
    t, te = wl.target_train, wl.target_test
    machine, _, masters = finetune(model, t.x, t.y, Schedule(epochs=2))
    x, y = te.x[:200], te.y[:200]
    program = compile_infer(model, CFG, len(y), rank=4)
    load(machine, program, infer_images(model, x, y, CFG, frozen=False))
    assert machine.run(program.entry) is Error.NONE
    base, xs = frozen_forward(model, quantize_input(model, x, CFG), CFG)
    pred = argmax(adapter_forward(model, xs, base, masters, CFG)[0])
    results = np.array(read_words(machine, Region.RESULTS, len(y)))
    assert_array_equal(results & 0xFF, pred)
    assert_array_equal(results >> 8, pred == y)
    assert reg(machine, Regs.SAMPLES) == len(y)
    assert reg(machine, Regs.CORRECT) == int((pred == y).sum())
    assert reg(machine, Regs.UPDATES) == 0
    assert machine.phase is Phase.NONE
    # the adapters stayed where the fine-tune left them
    words = read_words(machine, Region.ADAPTERS, adapter_count(model, 4, CFG))
    assert adapters_sha256(read_masters(words, model, 4, CFG)) == adapters_sha256(masters)


def _code(program):
    return [decode(w) for w in program.words[:program.code_words]]


@pytest.mark.parametrize("cache", [True, False])
def test_program_shape(digits, cache):
    """The sequence of docs/isa.md: loads, clear, phases, loops, one UPDATE per batch."""
    _, model = digits
    s = Schedule(epochs=4, batch=20, cache=cache)
    program = compile_finetune(model, s, CFG, 359)
    code = _code(program)
    ops = [op for op, _ in code]
    assert [f["reg"] for op, f in code if op is Opcode.LOAD] == list(Reg)
    assert code[5] == (Opcode.CLEAR, dict(grads=1, moments=1, seed=1, cache=1, counters=1))
    phases = [f["phase"] for op, f in code if op is Opcode.PHASE]
    loops = [f["count"] for op, f in code if op is Opcode.LOOP]
    L = len(model.layers)
    if cache:
        assert phases == [Phase.FROZEN, Phase.CACHED, Phase.NONE]
        assert loops == [17, 20, 19, 3, 17, 20, 19]
        body = [Opcode.LOOKUP, Opcode.BRANCH, Opcode.MOVE] + [Opcode.LAYER] * L + \
            [Opcode.GATHER, Opcode.INCIDX]
        assert all(f == {"lora": 1, "fill": 1} for op, f in code if op is Opcode.GATHER)
    else:
        assert phases == [Phase.FROZEN, Phase.NONE]
        assert loops == [4, 17, 20, 19]
        body = [Opcode.MOVE] + [Opcode.LAYER] * L + [Opcode.GATHER, Opcode.INCIDX]
        assert all(f == {"lora": 1, "fill": 0} for op, f in code if op is Opcode.GATHER)
    epoch = [Opcode.SETIDX, Opcode.LOOP, Opcode.LOOP] + body + \
        [Opcode.ENDLOOP, Opcode.UPDATE, Opcode.ENDLOOP, Opcode.LOOP] + body + [Opcode.ENDLOOP, Opcode.UPDATE]
    assert ops[:7] == [Opcode.LOAD] * 5 + [Opcode.CLEAR, Opcode.PHASE]
    assert ops[-2:] == [Opcode.PHASE, Opcode.HALT]
    middle = ops[7:-2]
    if cache:
        assert middle == epoch + [Opcode.PHASE, Opcode.LOOP] + epoch + [Opcode.ENDLOOP]
    else:
        assert middle == [Opcode.LOOP] + epoch + [Opcode.ENDLOOP]
    assert all(f["stride"] == 64 for op, f in code if op is Opcode.MOVE)
    assert program.updates == 4 * 18
    # data: the five registers, then one descriptor per layer, every LOAD / LAYER inside
    assert len(program.words) - program.code_words == 8 + 4 + 11 + 1 + 1 + 12 * L
    infer = _code(compile_infer(model, CFG, 200))
    assert [op for op, _ in infer] == [Opcode.LOAD] * 3 + [Opcode.CLEAR, Opcode.PHASE, Opcode.SETIDX,
                                                          Opcode.LOOP, Opcode.MOVE] + \
        [Opcode.LAYER] * L + [Opcode.GATHER, Opcode.INCIDX, Opcode.ENDLOOP, Opcode.PHASE, Opcode.HALT]
    assert infer[4][1]["phase"] is Phase.INFER and infer[6][1]["count"] == 200


def test_one_epoch_with_the_cache_has_no_cached_phase(digits):
    _, model = digits
    code = _code(compile_finetune(model, Schedule(epochs=1), CFG, 359))
    assert [f["phase"] for op, f in code if op is Opcode.PHASE] == [Phase.FROZEN, Phase.NONE]


def test_activation_placement(digits):
    """Every layer's input stays put until GATHER: the inputs are disjoint, stacked from 0."""
    _, model = digits
    plans = plan_activations(model, CFG)
    base = 0
    for l, p in enumerate(plans):
        assert p.fields["in_base"] == base
        base += p.in_words
        assert p.fields["out_base"] == (base if l < len(plans) - 1 else 0)
    assert plans[-1].fields["wide"] == 1
    assert [p.fields["w_base"] for p in plans] == [0, 9, 153, 409]
    with pytest.raises(LayoutError, match="layer 1: .*activation buffer has 80"):
        plan_activations(model, CFG.replace(act_words=80))


def test_compile_errors(digits):
    _, model = digits
    s = Schedule(epochs=3)
    with pytest.raises(ScheduleError, match="2000 samples: the device holds 1..1024"):
        compile_finetune(model, s, CFG, 2000)
    with pytest.raises(ScheduleError, match="exceed the sample memory"):
        compile_finetune(model, s, CFG.replace(sample_words=4096), 359)
    with pytest.raises(ScheduleError, match="epochs = 70000: a LOOP counts 1..65535"):
        compile_finetune(model, Schedule(epochs=70000, cache=False), CFG, 359)
    with pytest.raises(ScheduleError, match="rank 17 > 16"):
        compile_finetune(model, Schedule(rank=17), CFG, 359)
    with pytest.raises(LayoutError, match="the program takes 139 words; the program memory has 100"):
        compile_finetune(model, s, CFG.replace(program_words=100), 359)
    with pytest.raises(LayoutError, match="weights need 473 words"):
        compile_infer(model, CFG.replace(weight_words=8 * 400), 10)


def test_images(digits):
    """The image format: runs of 32-bit words; wide words chunk by chunk, with gaps
    where a word has fewer chunks than 2**chunk_bits; the machine reads them back."""
    wl, model = digits
    t = wl.target_train
    s = Schedule(rank=3, seed=7)
    images = finetune_images(model, t.x, t.y, s, CFG)
    n = len(t.y)
    assert [len(runs) for runs in images.values()] == [1] * 5
    assert len(images[Region.SAMPLES][0][1]) == n * 64 // 4
    order = np.concatenate(batch_order(n, s.batch, s.seed))
    assert images[Region.LABELS][0][1] == list(t.y[order])
    masters = init_adapters(model, 3, 7, CFG)
    assert images[Region.ADAPTERS][0][1] == master_words(masters, CFG)
    back = read_masters(images[Region.ADAPTERS][0][1], model, 3, CFG)
    assert adapters_sha256(back) == adapters_sha256(masters)
    # 12 lanes: 96-bit weights (3 chunks of 4 offsets), 384-bit biases (12 of 16)
    cfg = CFG.replace(array_cols=12)
    frozen = frozen_images(model, cfg)
    runs = frozen[Region.WEIGHTS]
    assert all(off == 4 * i and len(words) == 3 for i, (off, words) in enumerate(runs))
    assert all(off == 16 * i and len(words) == 12 for i, (off, words) in enumerate(frozen[Region.BIASES]))
    machine = Machine(cfg)
    for a, w in image_writes(frozen):
        machine.write(a, w)
    weights = np.concatenate([pack_weights(w, 12) for w in model.weights])
    biases = np.concatenate([pack_biases(b, 12) for b in model.biases])
    assert_array_equal(machine.weights[:len(weights)], weights)
    assert_array_equal(machine.biases[:len(biases)], biases)
    assert [machine.read(address(Region.WEIGHTS, 5, cfg, chunk=k)) for k in range(4)] == runs[5][1] + [0]


@pytest.mark.parametrize("lanes", [4, 16])
@pytest.mark.parametrize("rank", [1, 3, 4])
def test_adapter_layout(lanes, rank):
    """Every weight has its own word below the span; every tensor starts at a multiple of
    the lane count P, and no row of an A_l or B_l crosses one (the LoRA engine reads each
    row onto its lanes without rotating it)."""
    cfg = CFG.replace(max_rank=lanes, max_classes=lanes)
    sizes, classes = [5, 64, 7], min(lanes, 10)
    P = cfg.adapter_lanes
    addr = adapter_addresses(sizes, rank, classes, cfg)
    span = adapter_span(sizes, rank, cfg)
    assert len(set(addr.tolist())) == len(addr) == sum(d * rank + rank * classes for d in sizes)
    assert addr.max() < span
    bases, _ = adapter_bases(sizes, rank, cfg)
    off = 0
    for d, (a, b) in zip(sizes, bases):
        assert a % P == 0 and b % P == 0
        rows = addr[off:off + d * rank].reshape(d, rank)
        off += d * rank
        rows_b = addr[off:off + rank * classes].reshape(rank, classes)
        off += rank * classes
        for row in (*rows, *rows_b):
            assert (row // P == row[0] // P).all() and (np.diff(row) == 1).all()
        assert rows[0][0] == a and rows_b[0][0] == b


def test_adapter_layout_limits(digits):
    """The digits adapters at rank 4 take 1,408 words with padding (docs/isa.md); a rank
    or a class count beyond the lanes is refused."""
    model = digits[1]
    assert adapter_span(model.adapter_inputs, 4, CFG) == 1408
    with pytest.raises(ValueError, match="rank 17"):
        adapter_span([8], 17, CFG)
    with pytest.raises(ValueError, match="17 classes"):
        adapter_addresses([8], 4, 17, CFG)


def test_port():
    m = Machine(CFG)
    assert reg(m, Regs.ID) == ID_MAGIC and reg(m, Regs.CONFIG_HASH) == CFG.hash
    assert reg(m, Regs.GEOMETRY) == 8 | 8 << 8 | 16 << 16 | 8 << 24
    # a wide word commits on its last chunk only
    m.write(address(Region.WEIGHTS, 3, CFG, chunk=0), 0x04030201)
    assert not m.weights[3].any()
    m.write(address(Region.WEIGHTS, 3, CFG, chunk=1), 0x80FF0605)
    assert_array_equal(m.weights[3], [1, 2, 3, 4, 5, 6, -1, -128])
    assert m.read(address(Region.WEIGHTS, 3, CFG, chunk=1)) == 0x80FF0605
    m.write(address(Region.SAMPLES, 2, CFG), 0x80FF0201)
    assert list(m.samples[8:12]) == [1, 2, 0xFF, 0x80]
    # read only: RESULTS, LOGITS and the registers but CONTROL
    m.write(address(Region.RESULTS, 0, CFG), 5)
    m.write(address(Region.REGS, Regs.UPDATES, CFG), 5)
    assert m.read(address(Region.RESULTS, 0, CFG)) == 0 and reg(m, Regs.UPDATES) == 0
    # an endless program: refused while running, aborted by CONTROL
    asm = Assembler(CFG)
    for _ in range(10):
        asm.emit(Opcode.SYNC)
    asm.label("top")
    asm.emit(Opcode.INCIDX)
    asm.emit(Opcode.BRANCH, target="top")
    for i, w in enumerate(asm.assemble()):
        m.write(address(Region.PROGRAM, i, CFG), w)
    assert m.run(10, max_steps=101) is Error.NONE
    assert reg(m, Regs.STATUS) & 0xFF == Status.RUNNING and reg(m, Regs.INDEX) == 51
    assert reg(m, Regs.PC) == 11
    m.write(address(Region.LABELS, 0, CFG), 3)
    assert m.read(address(Region.LABELS, 0, CFG)) == 0 and m.labels[0] == 0
    assert reg(m, Regs.STATUS) & 0xFF == Status.RUNNING | Status.REFUSED
    m.write(address(Region.REGS, Regs.CONTROL, CFG), Control.ABORT)
    assert reg(m, Regs.STATUS) & 0xFF == Status.REFUSED
    m.write(address(Region.LABELS, 0, CFG), 3)
    assert m.read(address(Region.LABELS, 0, CFG)) == 3
    # cycle counters are not modelled
    assert all(reg(m, r) == 0 for r in (Regs.CYCLES, Regs.CYCLES_FROZEN, Regs.LAYER_CYCLES, Regs.LORA_FWD))


@pytest.fixture(scope="module")
def loaded(digits):
    """A digits fine-tune program with its images, to be broken."""
    wl, model = digits
    t = wl.target_train
    s = Schedule(epochs=2)
    return compile_finetune(model, s, CFG, len(t.y)), finetune_images(model, t.x, t.y, s, CFG)


@pytest.mark.parametrize("fault, error", [
    ([0xF8000000], Error.OPCODE),                                   # undefined opcode
    ([encode(Opcode.LOAD, addr=0, reg=0) | 7 << 16], Error.OPCODE),  # undefined register
    ([encode(Opcode.BRANCH, target=CFG.program_words, cond=0)], Error.PC),
    ([encode(Opcode.LOAD, addr=CFG.program_words - 3, reg=0)], Error.PC),
    ([encode(Opcode.LAYER, addr=CFG.program_words - 1)], Error.PC),
    ([encode(Opcode.LOOP, count=0)], Error.LOOP),
    ([encode(Opcode.LOOP, count=1)] * 4, Error.LOOP),               # five deep
    ([encode(Opcode.SETIDX, index=1024), encode(Opcode.MOVE, stride=64)], Error.INDEX),
    ([encode(Opcode.SETIDX, index=1024), encode(Opcode.GATHER, lora=1, fill=0)], Error.INDEX),
])
def test_errors_stop_and_leave_the_adapters(loaded, fault, error):
    """(h) a fault in place of the first UPDATE (after a batch of samples went through the
    adapters, a loop open) stops with its code; the adapters are as written."""
    program, images = loaded
    at = next(i for i, (op, _) in enumerate(_code(program)) if op is Opcode.UPDATE)
    m = _broken(program, images, at, fault)
    assert m.run() is error
    assert reg(m, Regs.SAMPLES) == 20 and reg(m, Regs.UPDATES) == 0
    _check_stopped(m, error, Phase.FROZEN)


@pytest.mark.parametrize("at, fault, error, phase, misses", [
    (6, [encode(Opcode.ENDLOOP)], Error.LOOP, Phase.NONE, 0),     # in place of PHASE FROZEN
    (1, [encode(Opcode.SYNC)], Error.CACHE, Phase.FROZEN, 1),     # in place of LOAD CACHE
])
def test_errors_before_the_first_sample(loaded, at, fault, error, phase, misses):
    """ENDLOOP without LOOP; a GATHER fill with no cache set up (the fill is refused)."""
    m = _broken(*loaded, at, fault)
    assert m.run() is error
    assert reg(m, Regs.CACHE_MISSES) == misses and reg(m, Regs.SAMPLES) == 0
    _check_stopped(m, error, phase)


def _broken(program, images, at, fault):
    words = list(program.words)
    words[at:at + len(fault)] = fault
    m = Machine(CFG)
    for a, w in image_writes({Region.PROGRAM: [(0, words)]}) + image_writes(images):
        m.write(a, w)
    m.before = read_words(m, Region.ADAPTERS, CFG.adapter_words)
    return m


def _check_stopped(m, error, phase):
    status = reg(m, Regs.STATUS)
    assert status & 0xFF == Status.ERROR and (status >> 8) & 0xFF == error.value
    assert (status >> 16) & 3 == phase.value
    assert read_words(m, Region.ADAPTERS, CFG.adapter_words) == m.before


def test_listing_is_the_disassembly(loaded):
    program, _ = loaded
    assert "BRANCH HIT, hit1" in program.listing and "LOAD ADAPTER, reg_adapter" in program.listing
    assert disassemble(program.words).count("\n") == program.listing.count("\n")
