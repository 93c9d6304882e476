"""The quantized base model: int8 weights, int32 biases, power-of-two scales.

A `QuantModel` is what the host uploads to the device. Per layer l it holds:

- ``s_x[l]``: fractional bits of the layer's int8 input,
- ``s_w[l]``: fractional bits of its int8 weights (bias: int32 at s_x + s_w),
- ``s_y[l]``: fractional bits of its output (int8; the last layer: int16 logits at F_z),
- ``shift[l] = s_x + s_w - s_y``: the requantization shift,

and ``s_x[l+1] == s_y[l]``. Saved as ``.npz`` together with the float weights it came
from, so the float baselines start from the same network.
"""

import dataclasses
import json
import zipfile
import zlib

import numpy as np

from .fixed import quantize_float
from .network import Layer

__all__ = ["QuantModel", "quantize_network", "load_model", "save_model", "open_npz", "ModelFileError"]


@dataclasses.dataclass
class QuantModel:
    name: str
    layers: list
    weights: list        # int64 arrays (fan_in, out_ch), values in int8 range
    biases: list         # int64 arrays (out_ch,), int32 range
    s_x: list
    s_w: list
    s_y: list
    float_params: list   # [(W, b)] float64, the network before quantization
    classes: int
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def shifts(self):
        return [x + w - y for x, w, y in zip(self.s_x, self.s_w, self.s_y)]

    @property
    def adapter_inputs(self):
        """Sizes d_l of the adapter inputs (the flattened layer inputs)."""
        return [layer.in_size for layer in self.layers]

    @property
    def macs(self):
        return sum(layer.macs for layer in self.layers)

    def output_bits(self, l, cfg):
        return cfg.logit_bits if l == len(self.layers) - 1 else cfg.act_bits


def _frac_bits_for(maxabs, bits):
    """Largest power-of-two scale whose grid fits ``maxabs`` into ``bits`` bits."""
    hi = (1 << (bits - 1)) - 1
    if maxabs <= 0:
        return 0
    return int(np.floor(np.log2(hi / maxabs)))


def quantize_network(name, layers, params, calib_x, cfg, classes, meta=None, percentile=99.99):
    """Post-training quantization with power-of-two scales.

    Weight scales cover max |W|; activation scales cover the given percentile of the
    float activations on ``calib_x`` (source pretraining data). The last layer's output
    is int16 at ``cfg.F_z``."""
    from .float_model import FloatNet
    net = FloatNet(layers, params)
    _, trace = net.forward(calib_x)
    s_x, s_w, s_y, ws, bs = [], [], [], [], []
    x_frac = _frac_bits_for(np.percentile(np.abs(calib_x), percentile), cfg.act_bits)
    for l, (layer, (w, b)) in enumerate(zip(layers, params)):
        wf = _frac_bits_for(np.abs(w).max(), cfg.weight_bits)
        if l == len(layers) - 1:
            yf = cfg.F_z
        else:
            nxt = trace[l + 1]["x"]
            yf = _frac_bits_for(np.percentile(np.abs(nxt), percentile), cfg.act_bits)
        s_x.append(x_frac)
        s_w.append(wf)
        s_y.append(yf)
        ws.append(quantize_float(w, wf, cfg.weight_bits))
        bs.append(quantize_float(b, x_frac + wf, cfg.acc_bits))
        x_frac = yf
    model = QuantModel(name, list(layers), ws, bs, s_x, s_w, s_y,
                       [(np.asarray(w), np.asarray(b)) for w, b in params], classes, dict(meta or {}))
    # The 4-bit cache format of each adapter input, calibrated on the same data.
    from .fixed_model import quantize_input, frozen_forward, cache4_shift
    _, xs = frozen_forward(model, quantize_input(model, calib_x, cfg), cfg)
    signed = [bool(x.min() < 0) for x in xs]
    model.meta["cache4_signed"] = signed
    model.meta["cache4_shift"] = [cache4_shift(x, sg) for x, sg in zip(xs, signed)]
    return model


def save_model(model, path):
    arrays = {}
    for l in range(len(model.layers)):
        arrays[f"w{l}"] = model.weights[l].astype(np.int8)
        arrays[f"b{l}"] = model.biases[l].astype(np.int32)
        arrays[f"fw{l}"] = model.float_params[l][0].astype(np.float32)
        arrays[f"fb{l}"] = model.float_params[l][1].astype(np.float32)
    header = {"format": "skiptune-model-1", "name": model.name, "classes": model.classes,
              "layers": [layer.to_dict() for layer in model.layers],
              "s_x": model.s_x, "s_w": model.s_w, "s_y": model.s_y, "meta": model.meta}
    arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)



def open_npz(path, kind="a skiptune model file"):
    """np.load that accepts only .npz archives (a .npy or a pickle is not ours);
    raises ValueError naming ``kind`` otherwise."""
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError:
        z = None           # numpy's guess (pickled data) would mislead the user
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"not {kind} (no .npz archive)")
    return z


class ModelFileError(Exception):
    pass


def load_model(path):
    try:
        with open_npz(path) as z:
            header = json.loads(bytes(z["header"]).decode())
            if header.get("format") != "skiptune-model-1":
                raise ModelFileError(f"{path} is not a skiptune model file")
            layers = [Layer.from_dict(d) for d in header["layers"]]
            n = len(layers)
            ws = [z[f"w{l}"].astype(np.int64) for l in range(n)]
            bs = [z[f"b{l}"].astype(np.int64) for l in range(n)]
            fp = [(z[f"fw{l}"].astype(np.float64), z[f"fb{l}"].astype(np.float64)) for l in range(n)]
    except ModelFileError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, EOFError,
            zipfile.BadZipFile, zlib.error) as e:
        raise ModelFileError(f"cannot read model file {path}: {e or type(e).__name__}") from None
    return QuantModel(header["name"], layers, ws, bs, header["s_x"], header["s_w"], header["s_y"],
                      fp, header["classes"], header.get("meta", {}))
