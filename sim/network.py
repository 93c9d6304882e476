"""Network description shared by the float and fixed-point models.

A network is a list of `Layer`. Tensors are channels-last: a conv layer's input is
(H, W, C), a 1-D conv has H == 1, and flattening (which is what an adapter sees) is
row-major over (H, W, C). Every layer computes, in order:

    y = pool(relu(conv_or_fc(x) + bias))

with `relu` and a `pool` x `pool` max-pool (along W only for 1-D) both optional.
Weights are stored as im2col matrices of shape (kh * kw * C_in, C_out), rows ordered
(i, j, c): the same order in which the conv unit walks a window.
"""

import dataclasses

import numpy as np

__all__ = ["Layer", "im2col", "col2im", "maxpool", "maxpool_backward"]


@dataclasses.dataclass(frozen=True)
class Layer:
    kind: str                  # "conv2d", "conv1d" or "fc"
    in_shape: tuple            # (H, W, C); (1, 1, d) for fc
    out_ch: int
    kernel: tuple = (1, 1)     # (kh, kw)
    pad: int = 0
    stride: int = 1
    relu: bool = True
    pool: int = 1

    def __post_init__(self):
        if self.kind not in ("conv2d", "conv1d", "fc"):
            raise ValueError(f"unknown layer kind {self.kind!r}")
        if self.stride not in (1, 2):
            raise ValueError("stride must be 1 or 2")

    @property
    def in_size(self):
        return int(np.prod(self.in_shape))

    @property
    def fan_in(self):
        """Rows of the weight matrix."""
        if self.kind == "fc":
            return self.in_size
        return self.kernel[0] * self.kernel[1] * self.in_shape[2]

    @property
    def conv_shape(self):
        """(H, W, C) after the conv/fc, before pooling."""
        if self.kind == "fc":
            return (1, 1, self.out_ch)
        h, w, _ = self.in_shape
        kh, kw = self.kernel
        pad_h = 0 if self.kind == "conv1d" else self.pad
        ho = (h + 2 * pad_h - kh) // self.stride + 1
        wo = (w + 2 * self.pad - kw) // self.stride + 1
        return (ho, wo, self.out_ch)

    @property
    def out_shape(self):
        ho, wo, c = self.conv_shape
        if self.pool == 1:
            return (ho, wo, c)
        if self.kind == "conv1d":
            return (ho, wo // self.pool, c)
        return (ho // self.pool, wo // self.pool, c)

    @property
    def out_size(self):
        return int(np.prod(self.out_shape))

    @property
    def macs(self):
        ho, wo, _ = self.conv_shape
        return ho * wo * self.fan_in * self.out_ch

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["in_shape"] = list(self.in_shape)
        d["kernel"] = list(self.kernel)
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["in_shape"] = tuple(d["in_shape"])
        d["kernel"] = tuple(d["kernel"])
        return cls(**d)


def _window_index(layer):
    h, w, _ = layer.in_shape
    kh, kw = layer.kernel
    ho, wo, _ = layer.conv_shape
    s = layer.stride
    rows = (np.arange(ho) * s)[:, None] + np.arange(kh)[None, :]      # (ho, kh)
    cols = (np.arange(wo) * s)[:, None] + np.arange(kw)[None, :]      # (wo, kw)
    return rows, cols


def _pads(layer):
    return (0 if layer.kind == "conv1d" else layer.pad), layer.pad


def im2col(x, layer):
    """(N, H, W, C) -> (N, Ho*Wo, kh*kw*C) windows, zero padded; works for any dtype."""
    if layer.kind == "fc":
        return x.reshape(x.shape[0], 1, -1)
    ph, pw = _pads(layer)
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    rows, cols = _window_index(layer)
    # patches[n, oh, ow, i, j, c]
    patches = xp[:, rows[:, None, :, None], cols[None, :, None, :], :]
    n, ho, wo, kh, kw, c = patches.shape
    return patches.reshape(n, ho * wo, kh * kw * c)


def col2im(dcols, layer):
    """Adjoint of `im2col`: scatter-add window gradients back to (N, H, W, C)."""
    n = dcols.shape[0]
    if layer.kind == "fc":
        return dcols.reshape((n,) + tuple(layer.in_shape))
    h, w, c = layer.in_shape
    kh, kw = layer.kernel
    ho, wo, _ = layer.conv_shape
    ph, pw = _pads(layer)
    dxp = np.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=dcols.dtype)
    rows, cols = _window_index(layer)
    d = dcols.reshape(n, ho, wo, kh, kw, c)
    for i in range(kh):
        for j in range(kw):
            r = rows[:, i]
            q = cols[:, j]
            np.add.at(dxp, (slice(None), r[:, None], q[None, :], slice(None)), d[:, :, :, i, j, :])
    return dxp[:, ph:ph + h, pw:pw + w, :]


def _pool_view(y, layer):
    n, h, w, c = y.shape
    p = layer.pool
    if layer.kind == "conv1d":
        return y[:, :, : (w // p) * p, :].reshape(n, h, w // p, 1, p, c)
    return y[:, : (h // p) * p, : (w // p) * p, :].reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)


def maxpool(y, layer):
    """`pool` x `pool` max-pool with stride `pool` (floor), (N, H, W, C) layout."""
    if layer.pool == 1 or layer.kind == "fc":
        return y
    v = _pool_view(y, layer)
    n, a, b = v.shape[:3]
    return v.reshape(n, a, b, -1, v.shape[-1]).max(axis=3)


def maxpool_backward(dout, y, layer):
    """Gradient of `maxpool`; ties send the gradient to the first maximum."""
    if layer.pool == 1 or layer.kind == "fc":
        return dout
    v = _pool_view(y, layer)
    n, a, b = v.shape[:3]
    flat = v.reshape(n, a, b, -1, v.shape[-1])
    arg = flat.argmax(axis=3)
    mask = np.zeros_like(flat)
    np.put_along_axis(mask, arg[:, :, :, None, :], 1.0, axis=3)
    dflat = mask * dout[:, :, :, None, :]
    dv = dflat.reshape(v.shape)
    dy = np.zeros_like(y)
    _, h, w, c = y.shape
    p = layer.pool
    if layer.kind == "conv1d":
        dy[:, :, : (w // p) * p, :] = dv.reshape(n, h, (w // p) * p, c)
    else:
        dy[:, : (h // p) * p, : (w // p) * p, :] = dv.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * p, (w // p) * p, c)
    return dy
