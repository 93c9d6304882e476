"""Skip2-LoRA fine-tuning schedules: bit-exact (the device's) and float (the reference).

Both read the same `Schedule`, the same adapter initialization and the same batches:
the host shuffles the fine-tuning samples once with the seed, and every epoch walks them
in that order in batches of `batch` (the last one may be smaller). Only the adapters
learn; the frozen network runs once per sample in the first epoch when the cache is on,
and every epoch when it is off.
"""

import dataclasses
import hashlib
import time

import numpy as np

from firmware.memmap import adapter_span

from .cache import ActivationCache
from .fixed import Lfsr, quantize_float
from .fixed_model import (quantize_input, frozen_forward, cache_format, adapter_forward,
                          loss_grad, argmax, adapter_grads, init_moments, update)
from .float_model import FloatNet, ce_grad, adapter_logits, MomentSGD
from .float_model import adapter_grads as float_adapter_grads

__all__ = ["float_init_adapters", "Schedule", "ScheduleError", "check_limits", "init_adapters", "batch_order", "lfsr_seed", "FixedResult",
           "finetune_fixed", "evaluate_fixed", "finetune_float", "evaluate_float", "float_optimizer",
           "adapters_sha256", "adapter_macs"]


class ScheduleError(ValueError):
    """A schedule that is invalid, or that the configuration cannot run."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    epochs: int = 20
    batch: int = 20
    rank: int = 4
    lr: float = 0.01
    cache: bool = True
    cache_bits: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch < 1 or self.rank < 1:
            raise ScheduleError("epochs, batch and rank must be at least 1")
        if not self.lr > 0:
            raise ScheduleError("the learning rate must be positive")
        if self.cache_bits not in (4, 8):
            raise ScheduleError("cache bits must be 4 or 8")


def check_limits(model, schedule, cfg):
    """Refuse what the datapath is not sized for (its accumulator widths are proven
    against these limits in docs/numerics.md)."""
    problems = []
    if schedule.batch > cfg.max_batch:
        problems.append(f"batch {schedule.batch} > {cfg.max_batch}")
    if schedule.rank > cfg.max_rank:
        problems.append(f"rank {schedule.rank} > {cfg.max_rank}")
    if model.classes > cfg.max_classes:
        problems.append(f"{model.classes} classes > {cfg.max_classes}")
    if len(model.layers) > cfg.max_layers:
        problems.append(f"{len(model.layers)} layers > {cfg.max_layers}")
    if max(model.adapter_inputs) > cfg.max_adapter_in:
        problems.append(f"adapter input {max(model.adapter_inputs)} > {cfg.max_adapter_in}")
    if schedule.rank <= cfg.max_rank:
        words = adapter_span(model.adapter_inputs, schedule.rank, cfg)
        if words > cfg.adapter_words:
            problems.append(f"{words} adapter words (weights and padding) > {cfg.adapter_words}")
    if schedule.cache and sum(model.adapter_inputs) > cfg.cache_act_words:
        problems.append(f"{sum(model.adapter_inputs)} cached activations per sample > {cfg.cache_act_words}")
    if not 2.0 ** -14 <= schedule.lr <= 16:
        problems.append(f"step size {schedule.lr:g} outside [2**-14, 16]")
    if problems:
        raise ScheduleError("the configuration cannot run this: " + "; ".join(problems))


def init_adapters(model, rank, seed, cfg):
    """Int32 masters [(A_l, B_l)]: A_l uniform in +-1/sqrt(d_l), B_l zero (as in LoRA)."""
    rng = np.random.default_rng(seed)
    out = []
    for d in model.adapter_inputs:
        a = rng.uniform(-1.0, 1.0, (d, rank)) / np.sqrt(d)
        out.append((quantize_float(a, cfg.F_m, cfg.master_bits),
                    np.zeros((rank, model.classes), np.int64)))
    return out


def batch_order(n, batch, seed):
    order = np.random.default_rng(seed + 1).permutation(n)
    return [order[i:i + batch] for i in range(0, n, batch)]


def lfsr_seed(seed):
    return (seed * 0x9E3779B1 + 0x2545F491) & 0xFFFFFFFF or 1


def adapter_macs(model, rank):
    """Multiply-accumulates per sample of (forward, gradients) of all adapters."""
    d = sum(model.adapter_inputs)
    c, nl = model.classes, len(model.layers)
    fwd = d * rank + nl * rank * c
    grad = 2 * nl * rank * c + d * rank
    return fwd, grad


def adapters_sha256(masters):
    """Digest of the master weights, int32 little-endian, A_0, B_0, A_1, ... row-major."""
    h = hashlib.sha256()
    for a, b in masters:
        h.update(np.ascontiguousarray(a, dtype="<i4").tobytes())
        h.update(np.ascontiguousarray(b, dtype="<i4").tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class FixedResult:
    masters: list
    frozen_forwards: int = 0     # samples that ran through the frozen network
    cache_hits: int = 0
    cache_misses: int = 0
    frozen_macs: int = 0
    adapter_macs: int = 0
    seconds: float = 0.0


def _gather_inputs(model, xq, idx, cache, bits, cfg, res):
    """Adapter inputs and base logits of samples ``idx``, through the cache if any."""
    if cache is None:
        base, xs = frozen_forward(model, xq[idx], cfg)
        res.frozen_forwards += len(idx)
        return cache_format(model, xs, bits), base
    miss = ~cache.lookup(idx)
    n = len(idx)
    xs_out = [np.zeros((n, d), np.int64) for d in model.adapter_inputs]
    base_out = np.zeros((n, model.classes), np.int64)
    if miss.any():
        base, xs = frozen_forward(model, xq[idx[miss]], cfg)
        res.frozen_forwards += int(miss.sum())
        cache.fill(idx[miss], xs, base)
        # samples past the capacity are used as computed, in the cache's format
        fresh = cache_format(model, xs, bits)
        for l in range(len(xs_out)):
            xs_out[l][miss] = fresh[l]
        base_out[miss] = base
    stored = cache.holds(idx)
    if stored.any():
        # everything the cache holds is read back through its bytes, even when just filled
        xs_c, base_c = cache.read(idx[stored])
        for l in range(len(xs_out)):
            xs_out[l][stored] = xs_c[l]
        base_out[stored] = base_c
    return xs_out, base_out


def finetune_fixed(model, x, y, schedule, cfg, progress=None):
    """The bit-exact fine-tune. ``x`` float inputs, ``y`` labels; ``progress(done,
    total)`` is called after every batch. Returns a `FixedResult`."""
    check_limits(model, schedule, cfg)
    t0 = time.perf_counter()
    xq = quantize_input(model, x, cfg)
    y = np.asarray(y, np.int64)
    masters = init_adapters(model, schedule.rank, schedule.seed, cfg)
    moments = init_moments(masters)
    lfsr = Lfsr(lfsr_seed(schedule.seed), cfg.lfsr_taps)
    cache = ActivationCache(model, cfg, schedule.cache_bits) if schedule.cache else None
    res = FixedResult(masters)
    batches = batch_order(len(y), schedule.batch, schedule.seed)
    total, done = schedule.epochs * len(batches), 0
    for _ in range(schedule.epochs):
        for idx in batches:
            xs, base = _gather_inputs(model, xq, idx, cache, schedule.cache_bits, cfg, res)
            z, hs = adapter_forward(model, xs, base, masters, cfg)
            g = loss_grad(z, y[idx], cfg)
            grads = adapter_grads(model, xs, hs, g, masters, cfg)
            masters, moments = update(model, masters, moments, grads, schedule.lr, lfsr, cfg)
            done += 1
            if progress:
                progress(done, total)
    res.masters = masters
    res.frozen_macs = res.frozen_forwards * model.macs
    res.adapter_macs = len(y) * schedule.epochs * sum(adapter_macs(model, schedule.rank))
    if cache is not None:
        res.cache_hits, res.cache_misses = cache.hits, cache.misses
    res.seconds = time.perf_counter() - t0
    return res


def evaluate_fixed(model, masters, x, y, cfg, chunk=1024):
    """Accuracy of the frozen network plus adapters (None: no adapters), bit-exact.
    At inference the adapters see the int8 layer inputs directly (no cache)."""
    xq = quantize_input(model, x, cfg)
    correct = 0
    for i in range(0, len(y), chunk):
        base, xs = frozen_forward(model, xq[i:i + chunk], cfg)
        z = base if masters is None else adapter_forward(model, xs, base, masters, cfg)[0]
        correct += int((argmax(z) == np.asarray(y[i:i + chunk])).sum())
    return correct / len(y)


def float_optimizer(schedule, cfg):
    """The float twin of the device's update rule, with the schedule's step size."""
    return MomentSGD(schedule.lr, 2.0 ** -cfg.beta1_shift, 2.0 ** -cfg.beta2_shift, 2.0 ** cfg.e_min)


def float_init_adapters(model, schedule, cfg):
    """The float twin of the device's initial adapters (`init_adapters` over 2**F_m)."""
    return [(a.astype(np.float64) / 2 ** cfg.F_m, b.astype(np.float64))
            for a, b in init_adapters(model, schedule.rank, schedule.seed, cfg)]


def finetune_float(model, x, y, schedule, cfg, progress=None):
    """Float Skip2-LoRA with the same init, batches, learning rate and moments; the
    square root is exact here (the device rounds it to a power of two). The float base
    network runs once (the float cache is exact, so cache on and off coincide)."""
    net = FloatNet(model.layers, model.float_params)
    base, trace = net.forward(np.asarray(x, np.float64))
    xs = [t["x"] for t in trace]
    y = np.asarray(y, np.int64)
    adapters = float_init_adapters(model, schedule, cfg)
    opt = float_optimizer(schedule, cfg)
    batches = batch_order(len(y), schedule.batch, schedule.seed)
    total, done = schedule.epochs * len(batches), 0
    for _ in range(schedule.epochs):
        for idx in batches:
            xb = [v[idx] for v in xs]
            z, hs = adapter_logits(base[idx], xb, adapters)
            grads = float_adapter_grads(xb, hs, ce_grad(z, y[idx]), adapters)
            flat = opt.step([w for pair in adapters for w in pair], [g for pair in grads for g in pair])
            adapters = list(zip(flat[0::2], flat[1::2]))
            done += 1
            if progress:
                progress(done, total)
    return adapters


def evaluate_float(model, adapters, x, y):
    net = FloatNet(model.layers, model.float_params)
    base, trace = net.forward(np.asarray(x, np.float64))
    z = base if adapters is None else adapter_logits(base, [t["x"] for t in trace], adapters)[0]
    return float((z.argmax(axis=1) == np.asarray(y)).mean())
