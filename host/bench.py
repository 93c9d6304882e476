"""`skiptune bench`: the fine-tune on the simulated board against the same fine-tune on
this machine's CPU, measured in one run (docs/bench.md).

For each workload (digits, fan):

- the device (`rtl`: the Verilated gateware of a board's configuration behind a
  pseudo-terminal) fine-tunes with the cache on and with it off, each on a freshly
  started board, as `skiptune finetune` does; its counters give cycles per phase
  (``frozen``: the epoch that fills the cache, or every epoch with the cache off;
  ``cached``: the epochs that read it), which become time at the bitstream's clock;
  the link's bytes become the UART time at the configuration's baud rate;
- the CPU runs the same method (Skip2-LoRA, same initial adapters, batches, step size
  and update rule, float) with PyTorch when it is importable (float32, the dtype a
  PyTorch user trains in) and always with NumPy (float64: `sim.finetune.finetune_float`,
  the project's accuracy reference), each single-threaded and on every core, with the
  activation cache (the frozen network once) and without it (every epoch).

Nothing here is a figure typed in: every ratio is between two measurements of this run.
"""

import dataclasses
import json
import os
import platform
import time

import numpy as np

from firmware.compiler import compile_finetune
from gateware.config import BOARDS, board_config
from sim.finetune import (Schedule, ScheduleError, adapter_macs, batch_order, evaluate_float, evaluate_fixed,
                          finetune_float, float_init_adapters, float_optimizer)
from sim.float_model import FloatNet, adapter_grads, adapter_logits, ce_grad

from .cli import Progress, UsageError, _emit_json
from .datasets import WORKLOADS, load_workload
from .device import open_device
from .models import load_base_model

__all__ = ["run_bench", "bitstream_clock", "torch_finetune", "numpy_finetune", "format_markdown"]

BENCH_WORKLOADS = ("digits", "fan")
# The targets, stated beside the measurements (never used to compute them).
TARGET_DIGITS_MS = 10.0
TARGET_FRACTION_OF_IDEAL = 0.8


# ------------------------------------------------------------------ the clock ---------

def bitstream_clock(cfg, report_path):
    """The clock the device's time is stated at: the ``target_mhz`` of the bitstream
    report at ``report_path`` when it was built from ``cfg`` (same config_hash), else
    the configuration's ``clock_hz``, stated as a default."""
    out = {"hz": cfg.clock_hz, "source": "configuration default (clock_hz; no bitstream report)",
           "report": None, "fmax_mhz": None, "timing_met": None}
    try:
        with open(report_path) as f:
            report = json.load(f)
    except FileNotFoundError:
        return out
    except (OSError, ValueError) as e:
        out["source"] = f"configuration default (clock_hz; {report_path} unreadable: {e})"
        return out
    if report.get("config_hash") != f"{cfg.hash:08x}":
        out["source"] = (f"configuration default (clock_hz; {report_path} is for configuration "
                         f"{report.get('config_hash')}, this one is {cfg.hash:08x})")
        return out
    out.update(hz=int(round(float(report["target_mhz"]) * 1e6)), report=str(report_path),
               source=f"bitstream report {report_path} (board {report.get('board')})",
               fmax_mhz=report.get("fmax_mhz"), timing_met=report.get("timing_met"))
    return out


# ------------------------------------------------------------------ the device --------

def _count_polls(dev):
    """Count the STATUS exchanges of ``dev`` and their bytes: the host polls every
    ``poll`` seconds of wall time, so on the simulated board (far slower than a real
    one) most of the received bytes are polls a board would not need."""
    polls = {"count": 0, "bytes": 0}
    status = dev.status

    def counted():
        sent, received = dev.bytes_sent, dev.bytes_received
        try:
            return status()
        finally:
            polls["count"] += 1
            polls["bytes"] += dev.bytes_sent - sent + dev.bytes_received - received

    dev.status = counted
    return polls


def _phase_macs(model, schedule, n, frozen_forwards):
    """MACs of the frozen network (on the array) and of the adapters (on the LoRA
    engine's lanes) in each counted phase, from the forward passes the device reports."""
    per_adapter = sum(adapter_macs(model, schedule.rank))
    e = schedule.epochs
    if schedule.cache:
        # epoch 1 runs every sample through the network; later epochs only those past the
        # cache's capacity (counted by the device as misses)
        frozen_phase = {"array": n * model.macs, "adapters": n * per_adapter}
        cached_phase = {"array": (frozen_forwards - n) * model.macs, "adapters": n * (e - 1) * per_adapter}
    else:
        frozen_phase = {"array": frozen_forwards * model.macs, "adapters": n * e * per_adapter}
        cached_phase = {"array": 0, "adapters": 0}
    return {"frozen": frozen_phase, "cached": cached_phase}


def epoch_cycles(cycles, epochs, cache):
    """Cycles of each epoch from the phase totals: with the cache, the fill epoch and
    the cached epochs at their mean; without it, the mean of all."""
    if cache:
        return [cycles["frozen"]] + ([cycles["cached"] / (epochs - 1)] * (epochs - 1) if epochs > 1 else [])
    return [cycles["frozen"] / epochs] * epochs


def device_run(cfg, board, clock_hz, wl, model, schedule, lanes, progress=None):
    """One fine-tune on a freshly started `rtl` device; every figure of it."""
    tr = wl.target_train
    n = len(tr)
    dev = open_device("rtl", cfg, board=board)
    try:
        polls = _count_polls(dev)
        t0 = time.perf_counter()
        res = dev.finetune(model, tr.x, tr.y, schedule, progress)
        wall = time.perf_counter() - t0
    finally:
        dev.close()
    c = res.cycles
    if not c:
        raise UsageError("the rtl device reported no cycle counts")
    phases = {"frozen": c["frozen"], "cached": c["cached"],
              "other": c["total"] - c["frozen"] - c["cached"]}
    macs = _phase_macs(model, schedule, n, res.frozen_forwards)
    pes = cfg.array_rows * cfg.array_cols
    util = {}
    for ph in ("frozen", "cached"):
        cyc = phases[ph]
        util[ph] = {"array": macs[ph]["array"] / (cyc * pes) if cyc else None,
                    "adapter_lanes": macs[ph]["adapters"] / (cyc * lanes) if cyc else None}
    e = schedule.epochs
    per_epoch = epoch_cycles(c, e, schedule.cache)
    link_bytes = res.link["sent"] + res.link["received"]
    return {
        "cache": "on" if schedule.cache else "off",
        "samples": n, "epochs": e,
        "cycles": {**phases, "total": c["total"], "layer_engine_busy": c["layer_engine"],
                   "lora_forward_busy": c["lora_forward"], "lora_update_busy": c["lora_update"]},
        "seconds": {k: v / clock_hz for k, v in (*phases.items(), ("total", c["total"]))},
        "epoch_seconds": [v / clock_hz for v in per_epoch],
        "macs": {"frozen_forward": res.macs["frozen_forward"], "adapters": res.macs["adapters"],
                 "total": res.macs["frozen_forward"] + res.macs["adapters"], "per_phase": macs},
        "mac_utilization": util,
        "frozen_forwards": res.frozen_forwards, "cache_hits": res.cache_hits, "cache_misses": res.cache_misses,
        "cache_overflow_samples": max(0, n - cfg.cache_samples) if schedule.cache else 0,
        "link": {"sent": res.link["sent"], "received": res.link["received"], "retries": res.link["retries"],
                 "status_polls": polls["count"], "status_poll_bytes": polls["bytes"],
                 "transfer_seconds": 10 * link_bytes / cfg.baud,
                 "transfer_seconds_without_polls": 10 * (link_bytes - polls["bytes"]) / cfg.baud},
        "adapters_sha256": res.sha256,
        # the device's adapters scored by the bit-exact model (its inference equals the
        # device's, tests/test_system.py), so no second simulation is needed for it
        "target_accuracy_after": evaluate_fixed(model, res.masters, wl.target_test.x, wl.target_test.y, cfg),
        "simulation_wall_seconds": wall,
    }


# ------------------------------------------------------------------ the CPU -----------

def numpy_finetune(model, x, y, schedule, cfg):
    """Float64 NumPy Skip2-LoRA; returns (adapters, seconds per epoch). Cache on:
    `sim.finetune.finetune_float` itself (the frozen network once); cache off: the
    same loop with the frozen network run on every batch of every epoch."""
    batches = batch_order(len(y), schedule.batch, schedule.seed)
    marks = [time.perf_counter()]
    if schedule.cache:
        def tick(done, total):
            if done % len(batches) == 0:
                marks.append(time.perf_counter())
        adapters = finetune_float(model, x, y, schedule, cfg, tick)
        return adapters, list(np.diff(marks))
    net = FloatNet(model.layers, model.float_params)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.int64)
    adapters = float_init_adapters(model, schedule, cfg)
    opt = float_optimizer(schedule, cfg)
    for _ in range(schedule.epochs):
        for idx in batches:
            base, trace = net.forward(x[idx])
            xb = [t["x"] for t in trace]
            z, hs = adapter_logits(base, xb, adapters)
            grads = adapter_grads(xb, hs, ce_grad(z, y[idx]), adapters)
            flat = opt.step([w for pair in adapters for w in pair], [g for pair in grads for g in pair])
            adapters = list(zip(flat[0::2], flat[1::2]))
        marks.append(time.perf_counter())
    return adapters, list(np.diff(marks))


class _TorchNet:
    """The frozen float network in PyTorch, computing what `sim.float_model.FloatNet`
    computes: channels-last tensors, im2col weight rows ordered (i, j, c), ReLU, then a
    floor max-pool (along W only for 1-D convolutions)."""

    def __init__(self, model, torch, dtype):
        self.torch, self.F = torch, torch.nn.functional
        self.layers = []
        for layer, (w, b) in zip(model.layers, model.float_params):
            if layer.kind == "fc":
                wt = torch.tensor(w, dtype=dtype)
            else:
                kh, kw = layer.kernel
                c = layer.in_shape[2]
                wt = torch.tensor(np.ascontiguousarray(w.reshape(kh, kw, c, layer.out_ch).transpose(3, 2, 0, 1)),
                                  dtype=dtype)
            self.layers.append((layer, wt, torch.tensor(b, dtype=dtype)))

    def forward(self, x):
        """(logits, [flattened input of every layer]) of ``x`` (N, ...)."""
        n = x.shape[0]
        a, xs = x, []
        for layer, w, b in self.layers:
            a = a.reshape((n,) + tuple(layer.in_shape))
            xs.append(a.reshape(n, -1))
            if layer.kind == "fc":
                out = a.reshape(n, -1) @ w + b
                if layer.relu:
                    out = self.F.relu(out)
                a = out
                continue
            pad = (0 if layer.kind == "conv1d" else layer.pad, layer.pad)
            out = self.F.conv2d(a.permute(0, 3, 1, 2), w, b, stride=layer.stride, padding=pad)
            if layer.relu:
                out = self.F.relu(out)
            if layer.pool > 1:
                k = (1, layer.pool) if layer.kind == "conv1d" else layer.pool
                out = self.F.max_pool2d(out, k)
            a = out.permute(0, 2, 3, 1)
        return a.reshape(n, -1), xs


def torch_finetune(model, x, y, schedule, cfg, dtype="float32", threads=1):
    """Skip2-LoRA in PyTorch, the computation of `numpy_finetune` (explicit gradients
    of the adapters only, the device's update rule's float twin); ``threads`` torch
    threads. Returns (adapters as float64 NumPy pairs, seconds per epoch).

    Before the clock starts, the inputs become tensors in the schedule's batch order
    (as the host uploads them to the device) with one-hot labels. To keep PyTorch's
    per-operation cost down on these small matrices, as `torch.optim`'s fused updates
    do, the adapters, their gradients and moments live in one flat buffer each, so an
    update is five operations whatever the number of layers."""
    import torch
    dt = getattr(torch, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            net = _TorchNet(model, torch, dt)
            order = batch_order(len(y), schedule.batch, schedule.seed)
            sizes = [len(idx) for idx in order]
            xt = torch.tensor(np.asarray(x)[np.concatenate(order)], dtype=dt)
            onehot = torch.nn.functional.one_hot(torch.tensor(np.asarray(y, np.int64)[np.concatenate(order)]),
                                                 model.classes).to(dt)
            x_b, onehot_b = torch.split(xt, sizes), torch.split(onehot, sizes)
            init = [p for pair in float_init_adapters(model, schedule, cfg) for p in pair]
            total = sum(p.size for p in init)
            flat, grad, m, v = (torch.zeros(total, dtype=dt) for _ in range(4))

            def views(buf):
                out, o = [], 0
                for p in init:
                    out.append(buf[o:o + p.size].view(p.shape))
                    o += p.size
                return out

            params, grads = views(flat), views(grad)
            for p, a in zip(params, init):
                p.copy_(torch.tensor(a, dtype=dt))
            opt = float_optimizer(schedule, cfg)
            b1, b2, eps, lr = opt.b1, opt.b2, opt.eps, opt.lr
            nl = len(model.layers)
            marks = [time.perf_counter()]
            if schedule.cache:
                base_all, xs_all = net.forward(xt)       # the float cache: exact
                cached = list(zip(torch.split(base_all, sizes), zip(*(torch.split(t, sizes) for t in xs_all))))
            for _ in range(schedule.epochs):
                for k in range(len(sizes)):
                    base, xb = cached[k] if schedule.cache else net.forward(x_b[k])
                    hs = [xb[l] @ params[2 * l] for l in range(nl)]
                    z = base + sum(hs[l] @ params[2 * l + 1] for l in range(nl))
                    g = torch.softmax(z, dim=1) - onehot_b[k]
                    for l in range(nl):
                        torch.matmul(xb[l].T, g @ params[2 * l + 1].T, out=grads[2 * l])
                        torch.matmul(hs[l].T, g, out=grads[2 * l + 1])
                    m.lerp_(grad, b1)                   # m += b1 (g - m)
                    v.lerp_(grad * grad, b2)            # v += b2 (g^2 - v)
                    flat.addcdiv_(m, v.sqrt().clamp_min_(eps), value=-lr)
                marks.append(time.perf_counter())
    finally:
        torch.set_num_threads(before)
    out = [p.double().numpy() for p in params]
    return list(zip(out[0::2], out[1::2])), list(np.diff(marks))


def _cpu_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _numpy_threads(k):
    """A context limiting NumPy's BLAS to ``k`` threads (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(k)


def cpu_runs(model, wl, schedule, cfg, threads, repeats, budget, progress=None):
    """Every CPU variant (backend x threads x cache on/off): timed runs until ``repeats``
    are done or ``budget`` seconds are spent on it (at least one), the median by total
    time kept; each backend is warmed up first with an untimed one-epoch run. The
    adapters of each are compared with the float64 NumPy reference (cache on) and scored
    on the target test set."""
    tr, tgt = wl.target_train, wl.target_test
    try:
        import torch
        backends = {"torch": torch.__version__}
    except ImportError:
        backends = {}
    backends["numpy"] = np.__version__
    counts = sorted({1, threads})
    variants = [(b, k, c) for b in backends for k in counts for c in (True, False)]
    ref, _ = numpy_finetune(model, tr.x, tr.y, schedule, cfg)
    scale = max(float(np.abs(w).max()) for pair in ref for w in pair)
    warm = dataclasses.replace(schedule, epochs=1)
    if "torch" in backends:
        torch_finetune(model, tr.x, tr.y, warm, cfg)     # first-call costs off the clock
    out = {"backends": backends, "threads": counts, "repeats": repeats, "budget_seconds": budget, "runs": [],
           "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    for i, (backend, k, cache) in enumerate(variants):
        sched = dataclasses.replace(schedule, cache=cache)
        timed, t0 = [], time.perf_counter()
        while len(timed) < repeats and (not timed or time.perf_counter() - t0 < budget):
            if backend == "torch":
                adapters, epochs = torch_finetune(model, tr.x, tr.y, sched, cfg, "float32", k)
            else:
                with _numpy_threads(k):
                    adapters, epochs = numpy_finetune(model, tr.x, tr.y, sched, cfg)
            timed.append((sum(epochs), epochs, adapters))
        if progress:
            progress(i + 1, len(variants))
        timed.sort(key=lambda t: t[0])
        total, epochs, adapters = timed[(len(timed) - 1) // 2]
        diff = max(float(np.abs(a - ra).max()) for pair, rpair in zip(adapters, ref) for a, ra in zip(pair, rpair))
        out["runs"].append({
            "backend": backend, "dtype": "float32" if backend == "torch" else "float64", "threads": k,
            "cache": "on" if cache else "off", "seconds": total, "epoch_seconds": epochs,
            "all_seconds": [t[0] for t in timed],
            "max_abs_diff_vs_reference": diff, "relative_diff_vs_reference": diff / scale,
            "target_accuracy_after": evaluate_float(model, adapters, tgt.x, tgt.y),
        })
    if hasattr(os, "getloadavg"):
        out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    out["primary"] = "torch" if "torch" in backends else "numpy"
    fastest = min((r for r in out["runs"] if r["cache"] == "on"), key=lambda r: r["seconds"])
    out["fastest"] = {k: fastest[k] for k in ("backend", "threads", "cache", "seconds")}
    return out


def cpu_pick(cpu, backend=None, threads=1, cache="on"):
    backend = backend or cpu["primary"]
    for r in cpu["runs"]:
        if r["backend"] == backend and r["threads"] == threads and r["cache"] == cache:
            return r
    return None


# ------------------------------------------------------------------ the run -----------

def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": _cpu_threads(), "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def _positive(name, text):
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} takes a positive integer, not {text!r}") from None
    if value < 1:
        raise UsageError(f"--{name} takes a positive integer, not {value}")
    return value


def _options(args):
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not names:
        raise UsageError("--workloads names no workload")
    for w in names:
        if w not in WORKLOADS:
            raise UsageError(f"unknown workload {w!r} in --workloads: choose from {', '.join(BENCH_WORKLOADS)}")
        if w not in BENCH_WORKLOADS:
            raise UsageError(f"workload {w!r} is not benchmarked (it needs a model you bring): "
                             f"choose from {', '.join(BENCH_WORKLOADS)}")
    if len(set(names)) != len(names):
        raise UsageError("--workloads names a workload twice")
    epochs = _positive("epochs", args.epochs) if args.epochs is not None else (2 if args.quick else 20)
    repeats = _positive("repeats", args.repeats) if args.repeats is not None else (1 if args.quick else 5)
    threads = _positive("threads", args.threads) if args.threads is not None else _cpu_threads()
    if args.board not in BOARDS:
        raise UsageError(f"unknown board {args.board!r}: choose one of {', '.join(BOARDS)}")
    return names, epochs, repeats, threads


def run_bench(args):
    names, epochs, repeats, threads = _options(args)
    out_dir = args.out
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out_dir}: {e.strerror}") from None
    cfg = board_config(args.board)
    report_path = args.report or os.path.join("build", args.board, "report.json")
    clock = bitstream_clock(cfg, report_path)
    lanes = cfg.adapter_lanes
    show = not args.quiet and args.json != "-"
    schedule = Schedule(epochs=epochs)
    record = {
        "command": "bench", "quick": bool(args.quick), "machine": _machine(),
        "schedule": {"epochs": epochs, "batch": schedule.batch, "rank": schedule.rank, "lr": schedule.lr,
                     "cache_bits": schedule.cache_bits, "seed": schedule.seed, "optimizer": "shift-adam"},
        "device": {"name": "rtl", "board": args.board, "config_hash": f"{cfg.hash:08x}",
                   "array": [cfg.array_rows, cfg.array_cols], "pes": cfg.array_rows * cfg.array_cols,
                   "adapter_lanes": lanes, "cache_samples": cfg.cache_samples, "baud": cfg.baud,
                   "config_clock_hz": cfg.clock_hz, "clock_hz": clock["hz"], "clock": clock},
        "targets": {"digits_compute_ms_max": TARGET_DIGITS_MS, "fraction_of_ideal_min": TARGET_FRACTION_OF_IDEAL},
        "workloads": {},
    }
    # every workload loads before the first simulation: a missing data folder fails at once
    loaded = {name: (load_workload(name, None, args.data if name == "fan" else None), load_base_model(name, None))
              for name in names}
    for name, (wl, model) in loaded.items():
        # and a board whose configuration cannot run one (the smaller ECP5 parts) says so
        # now, not after minutes of simulation
        for cache in (True, False):
            try:
                compile_finetune(model, Schedule(epochs=epochs, cache=cache), cfg, len(wl.target_train))
            except ScheduleError as e:
                raise UsageError(f"{name} on board {args.board}: {e} (--workloads chooses others)") from None
    for name, (wl, model) in loaded.items():
        entry = {"drift": wl.drift, "samples": len(wl.target_train), "epochs": epochs,
                 "macs_per_sample": {"frozen_forward": model.macs,
                                     "adapters": sum(adapter_macs(model, schedule.rank))},
                 "device": {}}
        for cache in (True, False):
            sched = Schedule(epochs=epochs, cache=cache)
            label = f"bench {name}: rtl, cache {'on' if cache else 'off'}"
            entry["device"][f"cache_{'on' if cache else 'off'}"] = device_run(
                cfg, args.board, clock["hz"], wl, model, sched, lanes, Progress(label, show))
        on, off = entry["device"]["cache_on"], entry["device"]["cache_off"]
        measured = off["cycles"]["total"] / on["cycles"]["total"]
        ideal = off["macs"]["total"] / on["macs"]["total"]
        entry["cache_speedup"] = {"measured": measured, "ideal": ideal, "fraction_of_ideal": measured / ideal,
                                  "same_adapters": on["adapters_sha256"] == off["adapters_sha256"]}
        entry["cpu"] = cpu_runs(model, wl, schedule, cfg, threads, repeats, 2.0 if args.quick else 20.0,
                                Progress(f"bench {name}: CPU", show))
        dev_s = on["seconds"]["total"]
        dev_link_s = dev_s + on["link"]["transfer_seconds"]
        cmp = {}
        for k in entry["cpu"]["threads"]:
            r = cpu_pick(entry["cpu"], threads=k)
            cmp[f"threads_{k}"] = {"cpu_seconds": r["seconds"], "device_seconds": dev_s,
                                   "cpu_over_device": r["seconds"] / dev_s, "device_over_cpu": dev_s / r["seconds"],
                                   "cpu_over_device_with_transfer": r["seconds"] / dev_link_s}
        f = entry["cpu"]["fastest"]
        cmp["fastest"] = {"cpu_seconds": f["seconds"], "device_seconds": dev_s, "backend": f["backend"],
                          "threads": f["threads"], "cpu_over_device": f["seconds"] / dev_s,
                          "device_over_cpu": dev_s / f["seconds"],
                          "cpu_over_device_with_transfer": f["seconds"] / dev_link_s}
        entry["device_vs_cpu"] = cmp
        record["workloads"][name] = entry
    os.makedirs(out_dir, exist_ok=True)
    md = format_markdown(record)
    record["plot"] = _plot(record, os.path.join(out_dir, "epochs.png"))
    _emit_json(os.path.join(out_dir, "report.json"), record)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    if args.json:
        _emit_json(args.json, record)
    if args.json != "-":
        print(md, end="")
        print(f"\nwritten: {os.path.join(out_dir, 'report.json')}, report.md"
              + (", epochs.png" if record["plot"] else " (no plot: matplotlib is not installed)"))
    return 0


# ------------------------------------------------------------------ output ------------

def _ms(s):
    return f"{1e3 * s:.2f} ms" if s < 10 else f"{s:.1f} s"


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f} %"


def format_markdown(record):
    """The table of docs/bench.md: one column per workload."""
    dev = record["device"]
    clk = dev["clock"]
    mhz = clk["hz"] / 1e6
    names = list(record["workloads"])
    w = record["workloads"]
    cpu0 = w[names[0]]["cpu"]
    primary = cpu0["primary"]
    n_threads = max(cpu0["threads"])

    def row(label, f):
        return f"| {label} | " + " | ".join(f(w[n]) for n in names) + " |"

    def dev_cycles(e, key):
        c = e["device"][key]["cycles"]
        return f"{c['total']:,} ({c['frozen']:,} frozen + {c['cached']:,} cached)"

    def cpu(e, k, cache, backend=primary):
        r = cpu_pick(e["cpu"], backend, k, cache)
        return "-" if r is None else _ms(r["seconds"])

    def util(e, ph):
        u = e["device"]["cache_on"]["mac_utilization"][ph]
        return f"{_pct(u['array'])} / {_pct(u['adapter_lanes'])}"

    def ratio(e, k):
        c = e["device_vs_cpu"][k if k == "fastest" else f"threads_{k}"]
        return (f"device {c['cpu_over_device']:.2f}x faster" if c["cpu_over_device"] >= 1
                else f"CPU {c['device_over_cpu']:.2f}x faster")

    lines = [
        f"skiptune bench: rtl device, board {dev['board']} (configuration {dev['config_hash']}, "
        f"{dev['array'][0]}x{dev['array'][1]} array, {dev['adapter_lanes']} adapter lanes, "
        f"cache {dev['cache_samples']} samples), {mhz:g} MHz from {clk['source']}"
        + ("" if clk["timing_met"] in (None, True) else f" (TIMING NOT MET: Fmax {clk['fmax_mhz']} MHz)")
        + f"; CPU: {record['machine']['cpu']}, {record['machine']['cores']} cores (load average "
        f"{record['machine']['load_average_at_start'][0] if record['machine']['load_average_at_start'] else '?'} "
        f"at the start), {primary} {cpu0['backends'][primary]}; {record['schedule']['epochs']} epochs, batch {record['schedule']['batch']}, "
        f"rank {record['schedule']['rank']}" + (" (quick)" if record["quick"] else ""),
        "",
        "| | " + " | ".join(f"{n} ({w[n]['drift']})" for n in names) + " |",
        "|---|" + "---|" * len(names),
        row("samples", lambda e: f"{e['samples']}" + (f" ({e['device']['cache_on']['cache_overflow_samples']} past the cache: frozen path every epoch)"
                                                     if e["device"]["cache_on"]["cache_overflow_samples"] else "")),
        row("device, cache on: cycles", lambda e: dev_cycles(e, "cache_on")),
        row(f"device, cache on: time at {mhz:g} MHz",
            lambda e: f"**{_ms(e['device']['cache_on']['seconds']['total'])}** (fill epoch "
                      f"{_ms(e['device']['cache_on']['seconds']['frozen'])}, cached "
                      f"{_ms(e['device']['cache_on']['seconds']['cached'])})"),
        row("device, cache off: cycles", lambda e: f"{e['device']['cache_off']['cycles']['total']:,}"),
        row(f"device, cache off: time at {mhz:g} MHz", lambda e: _ms(e["device"]["cache_off"]["seconds"]["total"])),
        row("cache speedup, measured (cycles off / on)", lambda e: f"{e['cache_speedup']['measured']:.2f}x"),
        row("cache speedup, ideal (MACs off / on)", lambda e: f"{e['cache_speedup']['ideal']:.2f}x"),
        row("measured / ideal", lambda e: f"{e['cache_speedup']['fraction_of_ideal']:.2f}"),
        row(f"UART transfer at {dev['baud'] / 1e6:g} Mbaud (cache on)",
            lambda e: f"{_ms(e['device']['cache_on']['link']['transfer_seconds'])} "
                      f"({_ms(e['device']['cache_on']['link']['transfer_seconds_without_polls'])} without STATUS polls)"),
        row("MAC utilization, fill epoch: array / adapter lanes", lambda e: util(e, "frozen")),
        row("MAC utilization, cached epochs: array / adapter lanes", lambda e: util(e, "cached")),
        row(f"CPU {primary}, 1 thread: cache on / off",
            lambda e: f"{cpu(e, 1, 'on')} / {cpu(e, 1, 'off')}"),
        *([row(f"CPU {primary}, {n_threads} threads: cache on / off",
               lambda e: f"{cpu(e, n_threads, 'on')} / {cpu(e, n_threads, 'off')}")] if n_threads > 1 else []),
        row("CPU numpy float64, 1 thread: cache on / off",
            lambda e: f"{cpu(e, 1, 'on', 'numpy')} / {cpu(e, 1, 'off', 'numpy')}"),
        row(f"device (cache on) vs CPU {primary} 1 thread (cache on)", lambda e: ratio(e, 1)),
        *([row(f"device (cache on) vs CPU {primary} {n_threads} threads (cache on)", lambda e: ratio(e, n_threads))]
          if n_threads > 1 else []),
        row("device (cache on) vs the fastest CPU run (cache on)",
            lambda e: f"{ratio(e, 'fastest')} ({e['cpu']['fastest']['backend']}, "
                      f"{e['cpu']['fastest']['threads']} thread{'s' if e['cpu']['fastest']['threads'] > 1 else ''}, "
                      f"{_ms(e['cpu']['fastest']['seconds'])})"),
        row("target accuracy after: device / CPU",
            lambda e: f"{e['device']['cache_on']['target_accuracy_after']:.3f} / "
                      f"{cpu_pick(e['cpu'], threads=1)['target_accuracy_after']:.3f}"),
    ]
    if "digits" in w:
        d = w["digits"]
        lines += ["", f"Targets (issue 8): digits compute at most {TARGET_DIGITS_MS:g} ms: "
                      f"{_ms(d['device']['cache_on']['seconds']['total'])}, "
                      f"{'met' if 1e3 * d['device']['cache_on']['seconds']['total'] <= TARGET_DIGITS_MS else 'not met'}; "
                      f"cache speedup at least {TARGET_FRACTION_OF_IDEAL:g} of ideal: "
                      f"{d['cache_speedup']['fraction_of_ideal']:.2f}, "
                      f"{'met' if d['cache_speedup']['fraction_of_ideal'] >= TARGET_FRACTION_OF_IDEAL else 'not met'}."]
    return "\n".join(lines) + "\n"


def _plot(record, path):
    """Time per epoch of the device (cache on, off) and the CPU; the path, or None when
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    names = list(record["workloads"])
    mhz = record["device"]["clock_hz"] / 1e6
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        e = record["workloads"][name]
        epochs = np.arange(1, e["epochs"] + 1)
        for key, style, label in (("cache_on", "o-", "device, cache on"), ("cache_off", "s-", "device, cache off")):
            ax.plot(epochs, 1e3 * np.array(e["device"][key]["epoch_seconds"]), style,
                    label=f"{label} ({mhz:g} MHz)")
        primary = e["cpu"]["primary"]
        for k in e["cpu"]["threads"]:
            for cache, style in (("on", "^--"), ("off", "v:")):
                r = cpu_pick(e["cpu"], primary, k, cache)
                ax.plot(epochs, 1e3 * np.array(r["epoch_seconds"]), style,
                        label=f"CPU {primary}, {k} thread{'s' if k > 1 else ''}, cache {cache}")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("time per epoch (ms)")
        ax.set_title(f"{name} ({e['drift']}), {e['samples']} samples")
        ax.grid(True, which="both", alpha=0.3)
    # one legend under the panels: the same lines in each, and none hides a curve
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
