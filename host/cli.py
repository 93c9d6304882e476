"""The `skiptune` command line: info, finetune, eval, bench, build, flash.

Every error a user can cause (a bad workload, drift spec, data folder or file) ends in
one line on stderr and exit status 2; an interrupted run exits 130.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from gateware.config import BOARDS, board_config
from sim.finetune import Schedule, ScheduleError, check_limits
from sim.qmodel import ModelFileError
from .datasets import DatasetError, WORKLOADS, load_workload
from .device import DEVICES, DeviceError, open_device, save_adapters, load_adapters
from .models import load_base_model
from platforms import BoardError

__all__ = ["main"]


class UsageError(Exception):
    pass


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label, enabled=True):
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, done, total):
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < total and now - self.last < 0.05:
            return
        self.last = now
        width = 30
        fill = int(width * done / total)
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] "
                         f"{done}/{total} {now - self.t0:5.1f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _add_device(p):
    p.add_argument("--device", default="model", help=f"device to run on ({', '.join(DEVICES)}, or a serial port such as /dev/ttyUSB0; default model)")
    p.add_argument("--port", metavar="PATH", help="serial port of the serial device (e.g. /dev/ttyUSB0)")
    p.add_argument("--link-faults", type=float, default=0.0, metavar="RATE",
                   help="rtl device only: corrupt, drop, duplicate or cut the link's bytes at this rate "
                        "per byte and direction (the host retries)")
    p.add_argument("--fault-seed", type=int, default=0, metavar="N", help="seed of --link-faults (default 0)")
    p.add_argument("--board", choices=tuple(BOARDS), help="use this board's configuration (default: the "
                   "simulation configuration); a serial port opens at its baud rate (3 Mbaud without one), "
                   "then the board's reported configuration is taken")


def _add_common(p):
    _add_device(p)
    p.add_argument("--workload", default="digits", help=f"{', '.join(WORKLOADS)} (default digits)")
    p.add_argument("--drift", help="drift spec: rotate:<deg>, shift:<px>[,<py>], noise:<sigma> (digits, "
                                   "mnist; default rotate:30) or env:noisy|env:silentB (fan; default env:noisy)")
    p.add_argument("--data", help="dataset folder (fan: the cooling-fan folder; mnist: IDX files)")
    p.add_argument("--model", help="base model file (default: the shipped model of the workload)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser():
    ap = argparse.ArgumentParser(prog="skiptune", description="On-board Skip2-LoRA fine-tuning.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="describe a device and its configuration")
    _add_device(p)
    p.add_argument("--json", metavar="PATH")
    p = sub.add_parser("finetune", help="fine-tune the adapters on the drifted target domain")
    _add_common(p)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01, help="shift-Adam step size (default 0.01)")
    p.add_argument("--cache", choices=("on", "off"), default="on")
    p.add_argument("--cache-bits", type=int, choices=(8, 4), default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-adapters", metavar="PATH", help="write the trained adapters to PATH")
    p = sub.add_parser("eval", help="accuracy of the base model, with adapters if given")
    _add_common(p)
    p.add_argument("--adapters", metavar="PATH", help="adapters saved by finetune --save-adapters")
    p = sub.add_parser("build", help="build a bitstream (yosys, nextpnr-ecp5, ecppack) -> build/<board>/")
    p.add_argument("--board", required=True, choices=tuple(BOARDS))
    p.add_argument("--out", metavar="DIR", default="build", help="build root (default build)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placement seed (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p = sub.add_parser("bench", help="fine-tune digits and fan on the simulated board (cache on, off) and on "
                       "this CPU -> build/bench/ (report.json, report.md, epochs.png)")
    p.add_argument("--quick", action="store_true", help="2 epochs and one timed CPU run per variant (CI)")
    p.add_argument("--workloads", default="digits,fan", metavar="LIST", help="comma-separated (default digits,fan)")
    p.add_argument("--epochs", metavar="N", help="epochs of every fine-tune (default 20; --quick: 2)")
    p.add_argument("--repeats", metavar="N", help="timed CPU runs per variant, the median is kept (default 5; --quick: 1)")
    p.add_argument("--threads", metavar="N", help="threads of the multi-threaded CPU runs (default: every core)")
    p.add_argument("--board", default="ulx3s-85f", help="simulate this board's configuration (default ulx3s-85f)")
    p.add_argument("--report", metavar="PATH", help="bitstream report whose clock to use (default build/<board>/report.json)")
    p.add_argument("--data", help="the cooling-fan folder (default ../shared/datasets/cooling-fan)")
    p.add_argument("--out", metavar="DIR", default=os.path.join("build", "bench"), help="output folder (default build/bench)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("flash", help="load a bitstream onto a board with openFPGALoader")
    p.add_argument("--board", required=True, choices=tuple(BOARDS))
    p.add_argument("--bitstream", metavar="PATH", help="the .bit file (default build/<board>/skiptune.bit)")
    p.add_argument("--flash", action="store_true", help="write the SPI flash (kept across power cycles) "
                   "instead of the FPGA's SRAM")
    return ap


def _emit_json(path, record):
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


def _table(rows):
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


_opened = []


def _open(args):
    """The device of ``--device`` / ``--port`` (`open_device` checks the options); `main`
    closes it."""
    dev = open_device(args.device, board_config(args.board), args.port, args.link_faults, args.fault_seed,
                      board=args.board)
    _opened.append(dev)
    return dev


def cmd_info(args):
    dev = _open(args)
    info = dev.info()
    if args.json:
        _emit_json(args.json, info)
    if args.json != "-":
        cfg = info["config"]
        print(f"skiptune device {info['device']}: config {info['config_hash']}, "
              f"{cfg['array_rows']}x{cfg['array_cols']} array, cache {cfg['cache_samples']} samples "
              f"x {cfg['cache_act_words']} activations (8 or 4 bits), "
              f"{cfg['clock_hz'] / 1e6:g} MHz, {cfg['baud']} baud")
    return 0


def _load(args):
    wl = load_workload(args.workload, args.drift, args.data)
    model = load_base_model(args.workload, args.model)
    first = model.layers[0]
    same = (first.in_size == int(np.prod(wl.input_shape)) if first.kind == "fc"
            else tuple(first.in_shape) == tuple(wl.input_shape))
    if not same:
        raise UsageError(f"model {args.model or args.workload} takes inputs {tuple(model.layers[0].in_shape)}, "
                         f"the {args.workload} data is {tuple(wl.input_shape)}")
    return wl, model


def cmd_finetune(args):
    schedule = Schedule(epochs=args.epochs, batch=args.batch, rank=args.rank, lr=args.lr,
                        cache=args.cache == "on", cache_bits=args.cache_bits, seed=args.seed)
    dev = _open(args)
    wl, model = _load(args)
    check_limits(model, schedule, dev.cfg)      # before any work, not after the baseline
    tr, src, tgt = wl.target_train, wl.source_test, wl.target_test
    before = {"source": dev.evaluate(model, None, src.x, src.y), "target": dev.evaluate(model, None, tgt.x, tgt.y)}
    res = dev.finetune(model, tr.x, tr.y, schedule,
                       Progress(f"fine-tune {wl.name} {wl.drift}", not args.quiet and args.json != "-"))
    after = {"source": dev.evaluate(model, res.masters, src.x, src.y),
             "target": dev.evaluate(model, res.masters, tgt.x, tgt.y)}
    if args.save_adapters:
        save_adapters(args.save_adapters, res.masters, model.name, dev.cfg, schedule)
    record = {
        "command": "finetune", "device": dev.name, "workload": wl.name, "drift": wl.drift,
        "config_hash": f"{dev.cfg.hash:08x}",
        "schedule": {"epochs": schedule.epochs, "batch": schedule.batch, "rank": schedule.rank,
                     "lr": schedule.lr, "cache": args.cache, "cache_bits": schedule.cache_bits,
                     "seed": schedule.seed, "optimizer": "shift-adam"},
        "samples": len(tr), "epochs": schedule.epochs,
        "accuracy_before": before["target"], "accuracy_after": after["target"],
        "source_accuracy_before": before["source"], "source_accuracy_after": after["source"],
        "target_test_samples": len(tgt), "source_test_samples": len(src),
        "finetune_seconds": res.seconds,
        "frozen_forwards": res.frozen_forwards, "cache_hits": res.cache_hits, "cache_misses": res.cache_misses,
        "macs": res.macs, "cycles": res.cycles, "clock_hz": dev.cfg.clock_hz,
        "link_bytes": {k: res.link[k] for k in ("sent", "received")}, "baud": dev.cfg.baud,
        "link_retries": dict(dev.retry_counts), "link_errors": dict(dev.link_errors),
        "adapters_sha256": res.sha256,
    }
    if args.json:
        _emit_json(args.json, record)
    if args.json != "-":
        cache = f"on, {schedule.cache_bits}-bit" if schedule.cache else "off"
        print(f"skiptune finetune: {wl.name} {wl.drift} on device {dev.name}")
        print(_table([
            ("", "before   after"),
            ("target-test accuracy", f"{before['target']:.4f}   {after['target']:.4f}   ({len(tgt)} samples)"),
            ("source-test accuracy", f"{before['source']:.4f}   {after['source']:.4f}   ({len(src)} samples)"),
            ("schedule", f"{len(tr)} samples, {schedule.epochs} epochs, batch {schedule.batch}, "
                         f"rank {schedule.rank}, lr {schedule.lr:g}, cache {cache}"),
            ("frozen forwards", f"{res.frozen_forwards} (cache hits {res.cache_hits}, misses {res.cache_misses})"),
            ("MACs", f"frozen {res.macs['frozen_forward'] / 1e6:.2f} M, adapters {res.macs['adapters'] / 1e6:.2f} M"),
            ("fine-tune time", f"{res.seconds:.2f} s (wall, this host)"),
            *([("device cycles", f"{res.cycles['total']} (frozen {res.cycles['frozen']}, cached "
                                 f"{res.cycles['cached']}): {1e3 * res.cycles['total'] / dev.cfg.clock_hz:.1f} ms "
                                 f"at {dev.cfg.clock_hz / 1e6:g} MHz")] if res.cycles else []),
            ("link", f"{res.link['sent']} bytes sent, {res.link['received']} received "
                     f"({10 * (res.link['sent'] + res.link['received']) / dev.cfg.baud:.3f} s at {dev.cfg.baud} baud)"),
            *([("link retries", ", ".join(f"{k} {v}" for k, v in sorted(dev.retry_counts.items())))]
              if dev.retry_counts else []),
            ("adapters sha256", res.sha256),
        ]))
        if args.save_adapters:
            print(f"  adapters saved to {args.save_adapters}")
    return 0


def cmd_eval(args):
    dev = _open(args)
    wl, model = _load(args)
    masters = load_adapters(args.adapters, model.name, dev.cfg) if args.adapters else None
    acc = {split: dev.evaluate(model, masters, getattr(wl, split).x, getattr(wl, split).y)
           for split in ("source_test", "target_test")}
    record = {"command": "eval", "device": dev.name, "workload": wl.name, "drift": wl.drift,
              "adapters": args.adapters, "source_accuracy": acc["source_test"], "accuracy": acc["target_test"]}
    if args.json:
        _emit_json(args.json, record)
    if args.json != "-":
        print(f"skiptune eval: {wl.name} {wl.drift} on device {dev.name}, "
              f"{'adapters ' + args.adapters if args.adapters else 'no adapters'}")
        print(_table([("target-test accuracy", f"{acc['target_test']:.4f}"),
                      ("source-test accuracy", f"{acc['source_test']:.4f}")]))
    return 0


def cmd_build(args):
    from platforms.build import build_bitstream, format_report   # amaranth-boards: only here
    report = build_bitstream(args.board, root=args.out, seed=args.seed,
                             progress=not args.quiet and args.json != "-" and sys.stderr.isatty())
    if args.json:
        _emit_json(args.json, report)
    if args.json != "-":
        print(format_report(report))
    return 0 if report["timing_met"] else 1


def cmd_bench(args):
    from .bench import run_bench        # torch and matplotlib: only here
    return run_bench(args)


def cmd_flash(args):
    from platforms.flash import flash_bitstream
    message = flash_bitstream(args.board, args.bitstream, to_flash=args.flash)
    print(message)
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return {"info": cmd_info, "finetune": cmd_finetune, "eval": cmd_eval,
                "build": cmd_build, "bench": cmd_bench, "flash": cmd_flash}[args.command](args)
    except (DatasetError, ModelFileError, DeviceError, ScheduleError, UsageError, BoardError) as e:
        print(f"skiptune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("skiptune: interrupted", file=sys.stderr)
        return 130
    finally:
        while _opened:
            _opened.pop().close()


if __name__ == "__main__":
    sys.exit(main())
