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
from firmware.memmap import ID_MAGIC, OFFSET_BITS, Region, Regs, Status
from gateware.config import DEFAULT
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
    link: dict | None = None    # bytes sent / received on the link


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
    """A skiptune device behind ``transport``, for configuration ``cfg``. Every request
    waits ``timeout`` seconds for its response and is sent again up to ``retries`` times
    (START is never resent: its fate is read from STATUS)."""

    def __init__(self, transport, cfg=DEFAULT, name="device", timeout=1.0, retries=2, poll=0.02):
        self.transport, self.cfg, self.name = transport, cfg, name
        self.timeout, self.retries, self.poll = timeout, retries, poll
        self.bytes_sent = self.bytes_received = 0
        self._seq = 0
        self._parser = P.FrameParser()
        self._frozen = None         # digest of the WEIGHTS/BIASES image in the device

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ requests ---------

    def _exchange(self, cmd, request, seq):
        self.transport.write(request)
        self.bytes_sent += len(request)
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._parser.expire()
                raise P.LinkError(f"no response to {P.Command(cmd).name} within {self.timeout:g} s")
            data = self.transport.read(P.OVERHEAD_BYTES + P.MAX_PAYLOAD, left)
            self.bytes_received += len(data)
            for frame in self._parser.feed(data):
                if frame.seq == seq and frame.cmd in (cmd | P.RESPONSE, P.ERROR_CMD):
                    return P.response_payload(frame, cmd, seq)

    def request(self, build, *args):
        """Send the request ``build(seq, *args)`` (a `host.protocol` builder) and return
        the payload of its response."""
        self._seq = (self._seq + 1) & 0xFF
        request = build(self._seq, *args)
        cmd = request[1]
        tries = 1 if cmd == P.Command.START else 1 + self.retries
        for attempt in range(tries):
            try:
                return self._exchange(cmd, request, self._seq)
            except P.ProtocolError as e:
                raise DeviceError(f"{self.name}: {e}") from None
            except P.LinkError as e:
                if attempt == tries - 1:
                    raise DeviceError(f"{self.name}: {e}") from None

    def identify(self):
        """ID, config hash and geometry; refuses another device or configuration."""
        ident = P.parse_identify(self.request(P.identify))
        if ident.id != ID_MAGIC:
            raise DeviceError(f"{self.name}: not a skiptune device (ID {ident.id:08x})")
        if ident.config_hash != self.cfg.hash:
            raise DeviceError(f"device configuration {ident.config_hash:08x}, "
                              f"host expects {self.cfg.hash:08x}")
        return ident

    def info(self):
        ident = self.identify()
        return {"device": self.name, "config_hash": f"{ident.config_hash:08x}",
                "config": self.cfg.as_dict()}

    def status(self):
        return P.parse_status(self.request(P.status))

    def write_words(self, address, words):
        for a, ws in bursts((address + i, w) for i, w in enumerate(words)):
            self.request(P.write, a, ws)

    def write_images(self, images):
        """Write ``{Region: [(offset, [words])]}`` (firmware.compiler) in WRITE bursts."""
        for a, ws in bursts(image_writes(images)):
            self.request(P.write, a, ws)

    def read_words(self, address, n):
        out = []
        for k in range(0, n, P.MAX_WORDS):
            count = min(P.MAX_WORDS, n - k)
            out += P.parse_read(self.request(P.read, address + k, count), count)
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
        self.request(P.start, program.entry)
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
        return digest

    def finetune(self, model, x, y, schedule, progress=None):
        t0 = time.perf_counter()
        sent, received = self.bytes_sent, self.bytes_received
        n = len(y)
        program = compile_finetune(model, schedule, self.cfg, n)
        images = finetune_images(model, x, y, schedule, self.cfg)
        for r in (Region.WEIGHTS, Region.BIASES):
            del images[r]
        digest = self._load_frozen(model, images)
        self.write_images(images)
        self._frozen = digest
        st = self.run(program, progress)
        masters = read_masters(self.read_words(_region(Region.ADAPTERS), adapter_count(model, schedule.rank)),
                               model, schedule.rank, self.cfg)
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
        link = {"sent": self.bytes_sent - sent, "received": self.bytes_received - received}
        return FinetuneResult(masters, adapters_sha256(masters), time.perf_counter() - t0, frozen,
                              hits, misses, macs, cycles, link)

    def evaluate(self, model, masters, x, y):
        """Accuracy of the frozen network plus ``masters`` (None: zero adapters, the base
        model), over chunks of samples that the device holds."""
        rank = Schedule.rank if masters is None else int(masters[0][0].shape[1])
        words = master_words(masters) if masters is not None else [0] * adapter_count(model, rank)
        images = {Region.ADAPTERS: [(0, words)]}
        self._frozen = self._load_frozen(model, images)
        d0 = model.adapter_inputs[0]
        chunk = max(1, min(self.cfg.max_samples, 4 * (self.cfg.sample_words // 4) // d0))
        correct = 0
        for i in range(0, len(y), chunk):
            xs, ys = x[i:i + chunk], y[i:i + chunk]
            images.update(sample_images(model, xs, ys, self.cfg))
            self.write_images(images)
            images = {}
            self.run(compile_infer(model, self.cfg, len(ys), rank))
            regs = self.registers()
            if regs[Regs.SAMPLES] != len(ys):
                raise DeviceError(f"{self.name}: inferred {regs[Regs.SAMPLES]} of {len(ys)} samples")
            correct += regs[Regs.CORRECT]
        return correct / len(y)


def open_device(name, cfg=DEFAULT, path=None):
    """A Device by name ("model", "rtl", "serial" with ``path`` its port, or a serial
    port's path itself, e.g. /dev/ttyUSB0), identified."""
    if name not in DEVICES and os.sep in name:
        name, path = "serial", name
    if name == "model":
        transport = ModelTransport(cfg)
    elif name == "rtl":
        transport = RtlTransport(cfg)
    elif name == "serial":
        if not path:
            raise DeviceError("the serial device needs --port PATH (e.g. /dev/ttyUSB0)")
        transport = SerialTransport(path, cfg.baud)
    else:
        raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    device = Device(transport, cfg, name, timeout=1.0 if name != "rtl" else 30.0)
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
