"""The device API that the CLI drives: one `Device` over any transport of the UART
protocol (docs/protocol.md, `host.protocol`):

- ``model``: the instruction-level model (`sim.machine.Machine`) serving the protocol
  in-process (`host.transport.ModelTransport`): exact, no cycle counters;
- ``rtl``: the gateware in a simulator behind a pseudo-terminal (`sim.board`);
- ``serial``: a board on a serial port (``--port``).

`Device.finetune` compiles the schedule (`firmware.compiler`), uploads the program and
its memory images, runs it and reads the adapters and the counters back; `evaluate`
writes the adapters and runs the inference program in chunks the sample memory holds.
"""

import dataclasses
import hashlib
import os
import struct
import tempfile
import time
import zipfile
import zlib

import numpy as np

from firmware.compiler import (adapter_count, compile_finetune, compile_infer, finetune_images,
                               frozen_images, image_writes, master_words, read_masters, sample_images)
from firmware.isa import Error
from firmware.memmap import ID_MAGIC, OFFSET_BITS, Region, Regs, Status, chunk_bits
from gateware.config import DEFAULT, config_by_hash
from sim.finetune import Schedule, adapters_sha256, adapter_macs
from sim.qmodel import open_npz

from . import protocol as P
from .transport import DeviceError, ModelTransport, RtlTransport, SerialTransport

__all__ = ["DeviceError", "Device", "FinetuneResult", "open_device", "DEVICES",
           "save_adapters", "load_adapters"]

DEVICES = ("model", "rtl", "serial")


@dataclasses.dataclass
class FinetuneResult:
    masters: list
    sha256: str
    seconds: float
    frozen_forwards: int
    cache_hits: int
    cache_misses: int
    macs: dict            # per phase
    cycles: dict | None   # per phase, on devices with a cycle counter
    link: dict | None = None    # bytes sent / received on the link, retries per command


def _reg(reg):
    return Region.REGS.value << OFFSET_BITS | reg


def _region(region):
    return Region(region).value << OFFSET_BITS


def bursts(writes, limit=P.MAX_WORDS):
    """``(address, [words])`` WRITE bursts of ``(address, word)`` pairs in order:
    consecutive addresses merged, at most ``limit`` words each."""
    out = []
    for a, w in writes:
        if out and out[-1][0] + len(out[-1][1]) == a and len(out[-1][1]) < limit:
            out[-1][1].append(w)
        else:
            out.append((a, [w]))
    return out


class Device:
    """A skiptune device behind ``transport``, for configuration ``cfg``.

    Retries. The link may lose, corrupt, duplicate or cut bytes (a real UART rarely; the
    `rtl` device with ``--link-faults`` often). Every request gets up to ``retries + 1``
    attempts; an attempt fails when no valid response arrives in time (``timeout``
    seconds plus ``byte_time`` per byte of request and response, doubled after each failed
    attempt of the same request, up to 4x; ``byte_time`` is at least 3x the time per
    byte measured on the successful exchanges), when a response has a bad CRC (the attempt
    ends once the line has been quiet for ``quiet`` seconds after it), or when a frame with
    the attempt's seq answers another command. Each attempt has a new seq, so a late
    response to an earlier attempt is recognized and discarded. Before the next attempt
    the host waits ``settle`` seconds of silence (the device's watchdog, 64 byte times,
    clears any partial frame) and discards whatever arrived. When the attempts run out:
    ``DeviceError("<name>: no valid response to WRITE after 12 attempts (...)")``. (12:
    at 1 % faults per byte a small frame is lost about 3 times in 10, so 8 attempts would
    run out once in some thousands of requests, about once per fine-tune.) Error
    responses (the device refused the request) are never retried.

    - IDENTIFY, STATUS, READ, WRITE and ABORT are idempotent: resent as they are. WRITE and
      READ bursts adapt to the link: a failed attempt halves the burst (down to
      ``MIN_BURST`` words; the rest of the data goes in later requests), each success
      adds 4 words (up to 256): at 1 % faults per byte the bursts settle near 10 words.
    - START is not idempotent. `run` reads STATUS just before START (the device must be
      idle); STATUS ends with the link's count of the STARTs it served since reset. When
      a START attempt gets no valid response, the host reads STATUS again: if the count
      moved, the START took effect and is not resent; only while it has not is the START
      sent again. A START that the device refuses with START_WHILE_RUNNING after an
      earlier attempt also means the earlier one took effect. So a program runs exactly
      once per `start`, however many of its requests or responses the link loses.

    Resends are counted per command in ``retry_counts`` ({"WRITE": n, ...}); failed
    attempts by cause in ``link_errors`` (timeouts, bad frames, mismatched responses).
    """

    MIN_BURST = 2

    def __init__(self, transport, cfg=DEFAULT, name="device", timeout=1.0, retries=11, poll=0.02,
                 byte_time=0.0, settle=0.001, quiet=0.01, board=None):
        self.transport, self.cfg, self.name, self.board = transport, cfg, name, board
        self.timeout, self.retries, self.poll = timeout, retries, poll
        self.byte_time, self.settle, self.quiet = byte_time, settle, quiet
        self.bytes_sent = self.bytes_received = 0
        self.retry_counts = {}
        self.link_errors = {"timeout": 0, "bad_frame": 0, "mismatch": 0}
        self.burst = P.MAX_WORDS
        self._byte_seconds = byte_time
        self._seq = 0
        self._parser = P.FrameParser()
        self._frozen = None         # digest of the WEIGHTS/BIASES image in the device

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def retries_total(self):
        return sum(self.retry_counts.values())

    # ------------------------------------------------------------ requests ---------

    def _exchange(self, cmd, request, seq, expect, failed):
        """One attempt: send ``request``, return its response's payload; LinkError when
        none comes in time or a frame with its seq answers another command."""
        self.transport.write(request)
        self.bytes_sent += len(request)
        per_byte = max(self.byte_time, 3 * self._byte_seconds)
        wait = (self.timeout + (len(request) + expect) * per_byte) * (1 << min(failed, 2))
        t0 = time.monotonic()
        deadline = t0 + wait
        dropped = self._parser.dropped
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if self._parser.dropped > dropped:
                    self.link_errors["bad_frame"] += 1
                    raise P.LinkError(f"a {P.Command(cmd).name} response with a bad CRC")
                self.link_errors["timeout"] += 1
                raise P.LinkError(f"no response to {P.Command(cmd).name} within {wait:.3g} s")
            corrupted = self._parser.dropped > dropped
            data = self.transport.read(P.OVERHEAD_BYTES + P.MAX_PAYLOAD,
                                       min(left, self.quiet) if corrupted else left)
            self.bytes_received += len(data)
            if corrupted and not data:
                # a corrupted frame, then silence: the response will not come
                self.link_errors["bad_frame"] += 1
                raise P.LinkError(f"a {P.Command(cmd).name} response with a bad CRC")
            for frame in self._parser.feed(data):
                if frame.seq != seq:
                    continue                # a late response to an earlier attempt
                if frame.cmd not in (cmd | P.RESPONSE, P.ERROR_CMD):
                    self.link_errors["mismatch"] += 1
                    raise P.LinkError(f"response cmd 0x{frame.cmd:02x} to {P.Command(cmd).name}")
                try:
                    payload = P.response_payload(frame, cmd, seq)
                    # the link's speed, measured (a smoothed time per byte both ways)
                    sample = (time.monotonic() - t0) / (len(request) + P.OVERHEAD_BYTES + len(payload))
                    self._byte_seconds = 0.8 * self._byte_seconds + 0.2 * sample
                    return payload
                except P.ProtocolError:
                    raise
                except P.LinkError:
                    self.link_errors["mismatch"] += 1
                    raise

    def _drain(self):
        """Wait until the line has been quiet for ``settle`` seconds (the device's watchdog
        drops any partial request), discarding what arrives and any partial frame."""
        limit = time.monotonic() + max(1.0, 20 * self.settle)
        end = time.monotonic() + self.settle
        while (now := time.monotonic()) < end and now < limit:
            data = self.transport.read(P.OVERHEAD_BYTES + P.MAX_PAYLOAD, end - now)
            if data:
                self.bytes_received += len(data)
                self._parser.feed(data)     # stale frames are dropped with the bytes
                end = time.monotonic() + self.settle
        while self._parser.pending:
            self._parser.expire()

    def _call(self, cmd, make, expect=P.OVERHEAD_BYTES + 32, on_lost=None):
        """The response payload to the request ``make(seq)`` (called for each attempt, with
        a new seq); ``on_lost()`` after a failed attempt may return the result instead of
        resending (START)."""
        try:
            name = P.Command(cmd).name
        except ValueError:
            name = f"command 0x{cmd:02x}"     # one the device may not know (tests)
        attempts = 1 + self.retries
        for attempt in range(attempts):
            self._seq = (self._seq + 1) & 0xFF
            request = make(self._seq)
            try:
                payload = self._exchange(cmd, request, self._seq, expect, attempt)
            except P.ProtocolError as e:
                if on_lost and attempt and e.code == P.ErrorCode.START_WHILE_RUNNING:
                    return b""              # an earlier START took effect
                raise DeviceError(f"{self.name}: {e}") from None
            except P.LinkError as e:
                self._failed()
                if attempt == attempts - 1:
                    raise DeviceError(f"{self.name}: no valid response to {name} after {attempts} "
                                      f"attempts ({e})") from None
                self._drain()
                if on_lost is not None and on_lost():
                    return b""
                self.retry_counts[name] = self.retry_counts.get(name, 0) + 1
                continue
            self._succeeded()
            return payload

    def _failed(self):
        self.burst = max(self.MIN_BURST, self.burst // 2)

    def _succeeded(self):
        self.burst = min(P.MAX_WORDS, self.burst + 4)

    def request(self, build, *args):
        """Send the request ``build(seq, *args)`` (a `host.protocol` builder; not START,
        see `start`) and return the payload of its response, with retries."""
        cmd = build(0, *args)[1]
        if cmd == P.Command.START:
            raise ValueError("START goes through Device.start (it is not idempotent)")
        expect = P.OVERHEAD_BYTES + (4 * args[1] if cmd == P.Command.READ else 32)
        return self._call(cmd, lambda seq: build(seq, *args), expect)

    def start(self, entry, before):
        """START at ``entry`` on an idle device whose STATUS was ``before`` (a StatusWords
        read just now); never runs the program twice (see the class docstring)."""
        if before.status & Status.RUNNING:
            raise DeviceError(f"{self.name}: START while a program is running")

        def started():
            return self.status().starts != before.starts

        self._call(P.Command.START, lambda seq: P.start(seq, entry), on_lost=started)

    def identify(self):
        """ID, config hash and geometry; refuses another device or configuration."""
        ident = P.parse_identify(self.request(P.identify))
        if ident.id != ID_MAGIC:
            raise DeviceError(f"{self.name}: not a skiptune device (ID {ident.id:08x})")
        if ident.config_hash != self.cfg.hash:
            # a board on a serial port named by no --board: any known configuration
            adopt = self.name == "serial" and self.board is None
            known = config_by_hash(ident.config_hash) if adopt else None
            if known is None:
                raise DeviceError(f"device configuration {ident.config_hash:08x}, host expects "
                                  f"{self.cfg.hash:08x} ({self.board or 'the simulation default'}); "
                                  "a bitstream built from this version of skiptune has a known one")
            self.cfg = known
        return ident

    def info(self):
        ident = self.identify()
        return {"device": self.name, "config_hash": f"{ident.config_hash:08x}",
                "config": self.cfg.as_dict()}

    def status(self):
        return P.parse_status(self.request(P.status))

    def _chunks(self, address):
        """32-bit chunks per memory word of the region of ``address`` (1 for most)."""
        try:
            region = Region(address >> OFFSET_BITS & 0xF)
        except ValueError:
            return 1
        return 1 << chunk_bits(region, self.cfg)

    def _write_run(self, address, words):
        """WRITE consecutive ``words`` from ``address`` in bursts of at most ``burst``
        (ending on a whole memory word in a chunked region: a resent WRITE that started
        mid-word would commit the word with the chunks staged before it gone)."""
        i = 0
        unit = self._chunks(address)
        while i < len(words):
            n = [0]

            def make(seq):
                k = min(self.burst, len(words) - i)
                if unit > 1 and i + k < len(words):
                    first = (address + i) % unit
                    k = max(unit - first, (first + k) // unit * unit - first)
                    k = min(k, len(words) - i)
                n[0] = k
                return P.write(seq, address + i, words[i:i + n[0]])

            self._call(P.Command.WRITE, make)
            i += n[0]

    def write_words(self, address, words):
        for a, ws in bursts((address + i, w) for i, w in enumerate(words)):
            self._write_run(a, ws)

    def write_images(self, images):
        """Write ``{Region: [(offset, [words])]}`` (firmware.compiler) in WRITE bursts;
        when they hold the frozen model (WEIGHTS or BIASES), LOADED once all are written,
        which sets the device's model flag (START is refused without it)."""
        for a, ws in bursts(image_writes(images)):
            self._write_run(a, ws)
        if any(r in images for r in P.MODEL_REGIONS):
            self.request(P.loaded)

    def read_words(self, address, n):
        out = []
        while len(out) < n:
            k, count = len(out), [0]

            def make(seq):
                count[0] = min(self.burst, n - k)
                return P.read(seq, address + k, count[0])

            payload = self._call(P.Command.READ, make, P.OVERHEAD_BYTES + 4 * min(self.burst, n - k))
            out += P.parse_read(payload, count[0])
        return out

    def registers(self):
        """Every REGS word, {Regs: value}."""
        return dict(zip(Regs, self.read_words(_reg(0), len(Regs))))

    # ------------------------------------------------------------ programs ---------

    def run(self, program, progress=None):
        """Upload ``program`` (firmware.compiler.Program), START it and poll STATUS until
        it stops; ``progress(done, total)`` over its UPDATEs. Returns the last
        `host.protocol.StatusWords`; a program that stops with an error raises."""
        self.write_images({Region.PROGRAM: [(0, program.words)]})
        self.start(program.entry, self.status())
        try:
            while True:
                st = self.status()
                if progress and program.updates:
                    progress(min(st.updates, program.updates), program.updates)
                if not st.status & Status.RUNNING:
                    break
                time.sleep(self.poll)
        except KeyboardInterrupt:
            try:
                self.request(P.abort)
            finally:
                raise KeyboardInterrupt from None
        if st.status & Status.ERROR:
            code = st.status >> 8 & 0xFF
            try:
                what = Error(code).name
            except ValueError:
                what = f"code {code}"
            raise DeviceError(f"{self.name}: the {program.kind} program stopped with error {what} "
                              f"at pc {st.pc} (sample index {st.index})")
        if not st.status & Status.DONE:
            raise DeviceError(f"{self.name}: the {program.kind} program was aborted at pc {st.pc}")
        return st

    def _load_frozen(self, model, images):
        """WEIGHTS and BIASES, unless the device already holds these."""
        frozen = frozen_images(model, self.cfg)
        digest = hashlib.sha256(struct.pack(f"<{len(w)}I", *w) if (w := [v for _, v in image_writes(frozen)])
                                else b"").hexdigest()
        if digest != self._frozen:
            images.update(frozen)
            self._frozen = None     # until the new one is in whole (the device clears its flag too)
        return digest

    def finetune(self, model, x, y, schedule, progress=None):
        t0 = time.perf_counter()
        sent, received = self.bytes_sent, self.bytes_received
        retried = dict(self.retry_counts)
        n = len(y)
        program = compile_finetune(model, schedule, self.cfg, n)
        images = finetune_images(model, x, y, schedule, self.cfg)
        for r in (Region.WEIGHTS, Region.BIASES):
            del images[r]
        digest = self._load_frozen(model, images)
        self.write_images(images)
        self._frozen = digest
        st = self.run(program, progress)
        span = adapter_count(model, schedule.rank, self.cfg)
        masters = read_masters(self.read_words(_region(Region.ADAPTERS), span), model,
                               schedule.rank, self.cfg)
        regs = self.registers()
        hits, misses = regs[Regs.CACHE_HITS], regs[Regs.CACHE_MISSES]
        frozen = n * schedule.epochs - hits
        fwd, grad = adapter_macs(model, schedule.rank)
        adapters = n * schedule.epochs * (fwd + grad)
        first = n * model.macs + n * (fwd + grad)
        macs = {"frozen_forward": frozen * model.macs, "adapters": adapters, "first_epoch": first,
                "later_epochs": frozen * model.macs + adapters - first}
        cycles = None
        if st.cycles:
            cycles = {"total": st.cycles, "frozen": st.cycles_frozen, "cached": st.cycles_cached,
                      "layer_engine": regs[Regs.LAYER_CYCLES], "lora_forward": regs[Regs.LORA_FWD],
                      "lora_update": regs[Regs.LORA_UPD]}
        link = {"sent": self.bytes_sent - sent, "received": self.bytes_received - received,
                "retries": {k: v - retried.get(k, 0) for k, v in self.retry_counts.items()
                            if v != retried.get(k, 0)}}
        return FinetuneResult(masters, adapters_sha256(masters), time.perf_counter() - t0, frozen,
                              hits, misses, macs, cycles, link)

    def evaluate(self, model, masters, x, y):
        """Accuracy of the frozen network plus ``masters`` (None: zero adapters, the base
        model), over chunks of samples that the device holds."""
        rank = Schedule.rank if masters is None else int(masters[0][0].shape[1])
        if masters is not None:
            words = master_words(masters, self.cfg)
        else:
            words = [0] * adapter_count(model, rank, self.cfg)
        images = {Region.ADAPTERS: [(0, words)]}
        digest = self._load_frozen(model, images)
        d0 = model.adapter_inputs[0]
        chunk = max(1, min(self.cfg.max_samples, 4 * (self.cfg.sample_words // 4) // d0))
        correct = 0
        for i in range(0, len(y), chunk):
            xs, ys = x[i:i + chunk], y[i:i + chunk]
            images.update(sample_images(model, xs, ys, self.cfg))
            self.write_images(images)
            self._frozen, images = digest, {}      # only once the whole model is in
            self.run(compile_infer(model, self.cfg, len(ys), rank))
            regs = self.registers()
            if regs[Regs.SAMPLES] != len(ys):
                raise DeviceError(f"{self.name}: inferred {regs[Regs.SAMPLES]} of {len(ys)} samples")
            correct += regs[Regs.CORRECT]
        return correct / len(y)


def open_device(name, cfg=DEFAULT, path=None, faults=0.0, seed=0, board=None):
    """A Device by name ("model", "rtl", "serial" with ``path`` its port, or a serial
    port's path itself, e.g. /dev/ttyUSB0), identified. ``faults``/``seed``: link faults
    of the rtl device (`sim.board.launch`). ``board`` names ``cfg`` in messages; a serial
    device opened without one takes whichever known configuration its hash names."""
    if name not in DEVICES and os.sep in name:
        name, path = "serial", name
    if faults and name != "rtl":
        raise DeviceError(f"--link-faults needs --device rtl (the simulated board), not {name}")
    if not 0 <= faults <= 1:
        raise DeviceError(f"--link-faults is a rate per byte in 0..1, not {faults:g}")
    if name == "model":
        transport = ModelTransport(cfg)
    elif name == "rtl":
        transport = RtlTransport(cfg, faults, seed)
    elif name == "serial":
        if not path:
            raise DeviceError("the serial device needs --port PATH (e.g. /dev/ttyUSB0)")
        transport = SerialTransport(path, cfg.baud)
    else:
        raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "rtl":
        # the board simulates 0.25-1 M cycles/s and a byte is 40 cycles each way: wait
        # 10 ms plus 100 us a byte (or 3x the measured time a byte), doubling after each
        # failed attempt; the watchdog's 64 byte times (2560 cycles, about 10 ms) have
        # passed once the timeout and ``settle`` have
        device = Device(transport, cfg, name, timeout=0.01, byte_time=1e-4, settle=0.005, quiet=0.005,
                        board=board)
    elif name == "serial":
        device = Device(transport, cfg, name, timeout=0.1, byte_time=20 / cfg.baud,
                        settle=max(0.002, 2 * 64 * 10 / cfg.baud), quiet=0.02, board=board)
    else:
        device = Device(transport, cfg, name, timeout=1.0, settle=0.0, quiet=0.01, board=board)
    try:
        device.identify()
    except BaseException:
        device.close()
        raise
    return device


def save_adapters(path, masters, model_name, cfg, schedule):
    """Write adapters atomically (temporary file, then rename) with what they belong to."""
    arrays = {"config_hash": np.array(cfg.hash, np.uint32),
              "model": np.frombuffer(model_name.encode(), np.uint8),
              "rank": np.array(schedule.rank), "sha256": np.frombuffer(adapters_sha256(masters).encode(), np.uint8)}
    for l, (a, b) in enumerate(masters):
        arrays[f"A{l}"] = a.astype(np.int32)
        arrays[f"B{l}"] = b.astype(np.int32)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapters-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        raise DeviceError(f"cannot write {path}: {e.strerror}") from None



def load_adapters(path, model_name, cfg):
    """Read adapters saved by `save_adapters`; refuse another model, another
    configuration or a corrupt file."""
    try:
        with open_npz(path, "an adapters file") as z:
            if int(z["config_hash"]) != cfg.hash:
                raise DeviceError(f"{path} was trained for configuration {int(z['config_hash']):08x}, "
                                  f"this device is {cfg.hash:08x}")
            name = bytes(z["model"]).decode()
            if name != model_name:
                raise DeviceError(f"{path} holds adapters of model {name!r}, not {model_name!r}")
            layers = sum(1 for k in z.files if k.startswith("A"))
            masters = [(z[f"A{l}"].astype(np.int64), z[f"B{l}"].astype(np.int64)) for l in range(layers)]
            digest = bytes(z["sha256"]).decode()
    except DeviceError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, EOFError,
            zipfile.BadZipFile, zlib.error) as e:
        raise DeviceError(f"cannot read adapters from {path}: {e or type(e).__name__}") from None
    if adapters_sha256(masters) != digest:
        raise DeviceError(f"{path} is corrupt: its digest does not match its weights")
    return masters
