"""The device API that the CLI drives. Today one device: ``model``, the bit-exact golden
model run in-process; the ``rtl`` and ``serial`` transports will sit behind the same
methods.

A device holds a base model and a configuration; `finetune` runs a schedule on the
fine-tuning samples and returns the adapters with the device's counters, `evaluate`
runs inference with or without adapters.
"""

import dataclasses
import os
import tempfile
import zipfile
import zlib

import numpy as np

from gateware.config import DEFAULT
from sim.finetune import finetune_fixed, evaluate_fixed, adapters_sha256, adapter_macs
from sim.qmodel import open_npz

__all__ = ["DeviceError", "ModelDevice", "FinetuneResult", "open_device", "DEVICES",
           "save_adapters", "load_adapters"]

DEVICES = ("model",)


class DeviceError(Exception):
    """A problem with a device or a file it reads (one-line message)."""


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


class ModelDevice:
    """The golden model as a device: exact, instant, no cycle counter."""

    name = "model"

    def __init__(self, cfg=DEFAULT):
        self.cfg = cfg

    def info(self):
        return {"device": self.name, "config_hash": f"{self.cfg.hash:08x}",
                "config": self.cfg.as_dict()}

    def finetune(self, model, x, y, schedule, progress=None):
        res = finetune_fixed(model, x, y, schedule, self.cfg, progress)
        fwd, grad = adapter_macs(model, schedule.rank)
        n = len(y)
        macs = {"frozen_forward": res.frozen_macs,
                "adapters": res.adapter_macs,
                "first_epoch": n * model.macs + n * (fwd + grad),
                "later_epochs": res.frozen_macs + res.adapter_macs - n * model.macs - n * (fwd + grad)}
        return FinetuneResult(res.masters, adapters_sha256(res.masters), res.seconds,
                              res.frozen_forwards, res.cache_hits, res.cache_misses, macs, None)

    def evaluate(self, model, masters, x, y):
        return evaluate_fixed(model, masters, x, y, self.cfg)


def open_device(name, cfg=DEFAULT):
    if name == "model":
        return ModelDevice(cfg)
    raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")


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
