"""cocotb tests of the LoRA engine (gateware/lora.py, top-level ``lora_engine``): the
acceptance test of the fine-tuning step. Consecutive batches of the real digits fine-tune
(drift rotate:30, rank 4, lr 0.01, seed 0, 8-bit cache) from the real initial adapters
(``init_adapters``): every sample of a batch streamed through the engine as the
activation cache returns it, then ``update``; after every update all masters are read
through the port and compared bit-exactly with the golden loop of
`sim.finetune.finetune_fixed` (batch_order, the ActivationCache round trip,
adapter_forward, loss_grad, adapter_grads, update with ``Lfsr(lfsr_seed(seed))``), the
count of correct predictions with the argmax of the golden z, and the LFSR state. The
cycles per sample of the forward+gradient phase and of the update are logged.

Run through tests/gateware/test_lora.py; the configuration comes in SKIPTUNE_CFG, the
number of batches in SKIPTUNE_LORA_BATCHES and the samples per batch (the first ones of
each real batch) in SKIPTUNE_LORA_BATCH."""

import math

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from gateware.lora import lora_setup_layout
from gateware.layouts import sample_layout
from sim import fixed_model
from sim.finetune import (FixedResult, Schedule, _gather_inputs, adapter_macs, batch_order,
                          init_adapters)
from tests.gateware.streams import StreamSource, config_from_env, env_int, pack, start
from tests.gateware.test_adapter import flat_masters
from tests.gateware.test_lora import ref_lora, sample_beats, sample_cycles, setup_value

CFG = config_from_env()
N_BATCHES = env_int("SKIPTUNE_LORA_BATCHES", 3)
BATCH = env_int("SKIPTUNE_LORA_BATCH", 20)


def digits_run(sched, n_batches, batch):
    """(model, masters, [(xs, base, y)], samples per epoch) of the first ``n_batches``
    batches of the digits fine-tune (the first ``batch`` samples of each), as the device
    sees them: through the 8-bit activation cache."""
    from host.datasets import load_workload
    from host.models import load_base_model
    from sim.cache import ActivationCache

    model, wl = load_base_model("digits"), load_workload("digits", "rotate:30")
    t = wl.target_train
    xq = fixed_model.quantize_input(model, t.x, CFG)
    y_all = np.asarray(t.y, np.int64)
    masters = init_adapters(model, sched.rank, sched.seed, CFG)
    cache = ActivationCache(model, CFG, sched.cache_bits)
    res = FixedResult(masters)
    out = []
    for idx in batch_order(len(y_all), sched.batch, sched.seed)[:n_batches]:
        idx = idx[:batch]
        xs, base = _gather_inputs(model, xq, idx, cache, sched.cache_bits, CFG, res)
        out.append((xs, base, y_all[idx]))
    return model, masters, out, len(y_all)


async def pulse(dut, name):
    getattr(dut, name).value = 1
    await FallingEdge(dut.clk)
    getattr(dut, name).value = 0


async def wait_idle(dut, timeout=1_000_000):
    for _ in range(timeout):
        await ReadOnly()
        if not int(dut.busy.value):
            await FallingEdge(dut.clk)
            return
        await FallingEdge(dut.clk)
    raise AssertionError("busy for ever")


async def read_port(dut, count):
    """(masters, accumulators) as flat lists, one word per cycle through the port (a
    word is out two cycles after its address)."""
    ms, gs = [], []
    dut.mem_re.value = 1
    for a in range(count + 1):
        dut.mem_addr.value = min(a, count - 1)
        await FallingEdge(dut.clk)              # the word of the address set before
        if a:
            ms.append(dut.mem_rmaster.value.to_signed())
            gs.append(dut.mem_rgrad.value.to_signed())
    dut.mem_re.value = 0
    return ms, gs


@cocotb.test()
async def digits_finetune(dut):
    """N_BATCHES consecutive batches of the digits fine-tune at full rate: masters, LFSR
    and correct predictions after every update, bit-exact; cycles per phase logged."""
    sched = Schedule(batch=20, rank=4, lr=0.01, seed=0, cache_bits=8)
    model, masters, batches, n_train = digits_run(sched, N_BATCHES, BATCH)
    want = ref_lora(model, batches, masters, sched.lr, sched.seed, CFG)
    sizes, classes = list(model.adapter_inputs), model.classes
    flat = flat_masters(masters, CFG)
    n_w = sum(a.size + b.size for a, b in masters)
    mant, exp = fixed_model.lr_mantissa(sched.lr, CFG)

    for name in ("update", "reset_moments", "clear_grads", "clear_counters", "seed_load",
                 "mem_re", "mem_we", "mem_clr", "mem_addr", "mem_wdata"):
        getattr(dut, name).value = 0
    dut.setup.value = pack(lora_setup_layout(CFG),
                           setup_value(sizes, model.s_x, sched.rank, classes, CFG))
    dut.mant.value = mant
    dut.exp.value = exp
    src = StreamSource(dut, "i_stream", sample_layout(CFG))
    await start(dut)
    dut.mem_we.value = 1
    for a, w in enumerate(flat):
        dut.mem_addr.value = a
        dut.mem_wdata.value = w & 0xFFFFFFFF
        await FallingEdge(dut.clk)
    dut.mem_we.value = 0
    from sim.finetune import lfsr_seed
    dut.seed.value = lfsr_seed(sched.seed)
    await pulse(dut, "seed_load")
    dut.clear_grads.value = 1
    dut.reset_moments.value = 1
    await FallingEdge(dut.clk)
    dut.clear_grads.value = 0
    dut.reset_moments.value = 0
    await wait_idle(dut)

    fwd_macs, grad_macs = adapter_macs(model, sched.rank)
    per_sample, upd_cycles = [], []
    for k, ((xs, base, y), (w_flat, w_pred, w_lfsr)) in enumerate(zip(batches, want)):
        await pulse(dut, "clear_counters")
        beats = [b for n in range(len(y)) for b in sample_beats(xs, base, y, n)]
        await src.send(beats)
        await pulse(dut, "update")
        await wait_idle(dut)
        n_s, n_c = int(dut.n_samples.value), int(dut.n_correct.value)
        fwd, upd = int(dut.fwd_cycles.value), int(dut.upd_cycles.value)
        ms, gs = await read_port(dut, len(flat))
        w_correct = int((np.array(w_pred) == y).sum())
        assert n_s == len(y), f"batch {k}: {n_s} samples"
        assert n_c == w_correct, f"batch {k}: {n_c} correct, golden {w_correct}"
        diff = [a for a in range(len(flat)) if ms[a] != w_flat[a]]
        assert not diff, f"batch {k}: {len(diff)} masters differ, first at {diff[:5]}"
        assert not any(gs), f"batch {k}: accumulators not cleared"
        assert int(dut.lfsr.value) == w_lfsr, f"batch {k}: LFSR"
        assert ms != flat
        assert fwd == len(y) * sample_cycles(sum(sizes), len(sizes), sched.rank, classes, CFG.adapter_lanes)
        per_sample.append(fwd / len(y))
        upd_cycles.append(upd)
        dut._log.info(f"batch {k}: {len(y)} samples, {n_c} correct; masters bit-exact; "
                      f"forward+gradient {fwd / len(y):.1f} cycles/sample, update {upd} "
                      f"cycles ({100 * upd / (fwd + upd):.1f} % of the batch)")
    # one cached epoch of the digits fine-tune: every sample's forward+gradient, one
    # update per batch of 20
    fs = per_sample[-1]
    epoch = n_train * fs + math.ceil(n_train / sched.batch) * upd_cycles[-1]
    dut._log.info(f"digits rank {sched.rank}: {fs:.1f} cycles/sample forward+gradient for "
                  f"{fwd_macs} + {grad_macs} MACs ({(fwd_macs + grad_macs) / fs:.2f} MAC/cycle); "
                  f"update {upd_cycles[-1]} cycles for {n_w} weights; one cached epoch of "
                  f"{n_train} samples: {epoch / n_train:.1f} cycles/sample")
    assert all(u == n_w + 17 for u in upd_cycles)
