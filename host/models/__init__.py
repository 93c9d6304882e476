"""The shipped base models and the architecture of each workload.

`digits.npz` and `fan.npz` are written by ``scripts/pretrain.py`` (deterministic) and
documented in docs/models.md. `architecture()` is the one definition of each network.
"""

import os

from sim.network import Layer
from sim.qmodel import load_model, ModelFileError

__all__ = ["architecture", "model_path", "load_base_model", "ModelFileError"]

HERE = os.path.dirname(os.path.abspath(__file__))


def architecture(workload, input_shape, classes):
    """The layers of a workload's network for inputs of ``input_shape`` (H, W, C)."""
    h, w, c = input_shape
    if workload in ("digits", "mnist"):
        # mnist (14x14 after pooling) halves the channels so that its adapter inputs,
        # 196 + 196 + 72 + 32, fit the cache's 512 activations per sample
        c0, c1 = (8, 16) if workload == "digits" else (4, 8)
        l0 = Layer("conv2d", (h, w, c), c0, (3, 3), pad=1, relu=True, pool=2)
        l1 = Layer("conv2d", l0.out_shape, c1, (3, 3), pad=1, relu=True, pool=2)
        l2 = Layer("fc", (1, 1, l1.out_size), 32, relu=True)
        l3 = Layer("fc", (1, 1, 32), classes, relu=False)
        return [l0, l1, l2, l3]
    if workload == "fan":
        l0 = Layer("fc", (1, 1, h * w * c), 64, relu=True)
        l1 = Layer("fc", (1, 1, 64), 64, relu=True)
        l2 = Layer("fc", (1, 1, 64), classes, relu=False)
        return [l0, l1, l2]
    raise ValueError(f"no architecture for workload {workload!r}")


def model_path(workload):
    return os.path.join(HERE, f"{workload}.npz")


def load_base_model(workload, path=None):
    """The shipped base model of a workload, or the model file at ``path``."""
    path = path or model_path(workload)
    if not os.path.isfile(path):
        if workload == "mnist" and path == model_path("mnist"):
            raise ModelFileError("mnist has no shipped base model: train one with "
                                 "`python scripts/pretrain.py mnist --data PATH --out FILE` "
                                 "and pass --model FILE")
        raise ModelFileError(f"model file not found: {path}")
    return load_model(path)
