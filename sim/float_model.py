"""Float reference of the frozen network and of the Skip2-LoRA adapters (float64).

This is the accuracy reference: the fixed-point model in `sim/fixed_model.py` is
compared with it within tolerances, never to the bit.
"""

import numpy as np

from .network import im2col, col2im, maxpool, maxpool_backward

__all__ = ["FloatNet", "softmax", "ce_grad", "adapter_logits", "adapter_grads", "MomentSGD"]


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ce_grad(z, y):
    """Gradient of the summed cross-entropy with respect to the logits."""
    g = softmax(z)
    g[np.arange(len(y)), y] -= 1.0
    return g


class FloatNet:
    """A float network: `layers` (list of `Layer`) and `params` (list of (W, b)),
    W of shape (fan_in, out_ch)."""

    def __init__(self, layers, params):
        self.layers = list(layers)
        self.params = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in params]

    def forward(self, x, weights=None):
        """Returns (logits, trace); trace[l] holds what backward needs, and
        trace[l]["x"] is the flattened input of layer l (what adapter l sees)."""
        weights = self.params if weights is None else weights
        n = x.shape[0]
        a = x.reshape((n,) + tuple(self.layers[0].in_shape))
        trace = []
        for layer, (w, b) in zip(self.layers, weights):
            a = a.reshape((n,) + tuple(layer.in_shape))
            cols = im2col(a, layer)
            pre = cols @ w + b
            ho, wo, c = layer.conv_shape
            pre = pre.reshape(n, ho, wo, c)
            act = np.maximum(pre, 0) if layer.relu else pre
            out = maxpool(act, layer)
            trace.append({"x": a.reshape(n, -1), "cols": cols, "pre": pre, "act": act})
            a = out
        return a.reshape(n, -1), trace

    def backward(self, dz, trace, weights=None, need_input_grad=False):
        """Gradients (dW, db) of every layer for output gradient `dz`; with
        `need_input_grad` also the gradient of every layer's flattened input."""
        weights = self.params if weights is None else weights
        n = dz.shape[0]
        grads = [None] * len(self.layers)
        dxs = [None] * len(self.layers)
        d = dz
        for l in reversed(range(len(self.layers))):
            layer, (w, _), t = self.layers[l], weights[l], trace[l]
            d = d.reshape((n,) + tuple(layer.out_shape))
            d = maxpool_backward(d, t["act"], layer)
            if layer.relu:
                d = d * (t["pre"] > 0)
            ho, wo, c = layer.conv_shape
            d2 = d.reshape(n, ho * wo, c)
            dw = np.einsum("npk,npc->kc", t["cols"], d2)
            db = d2.sum(axis=(0, 1))
            grads[l] = (dw, db)
            if l > 0 or need_input_grad:
                dcols = d2 @ w.T
                d = col2im(dcols, layer).reshape(n, -1)
                dxs[l] = d
        return (grads, dxs) if need_input_grad else grads


def adapter_logits(base, xs, adapters):
    """z = f(x) + sum_l (x_l A_l) B_l, float. Returns z and the hidden h_l."""
    hs = [x @ a for x, (a, _) in zip(xs, adapters)]
    z = base + sum(h @ b for h, (_, b) in zip(hs, adapters))
    return z, hs


def adapter_grads(xs, hs, g, adapters):
    """Summed gradients (dA_l, dB_l) of every adapter for loss gradient g."""
    out = []
    for x, h, (a, b) in zip(xs, hs, adapters):
        out.append((x.T @ (g @ b.T), h.T @ g))
    return out


class MomentSGD:
    """Float twin of the device's shift-Adam: Adam without bias correction,
    ``m += b1 (g - m)``, ``v += b2 (g^2 - v)``, ``w -= lr m / max(sqrt(v), eps)``, on
    summed batch gradients. The device rounds sqrt(v) to a power of two; this twin
    does not."""

    def __init__(self, lr, b1, b2, eps):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = self.v = None

    def step(self, params, grads):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            self.m[i] += self.b1 * (g - self.m[i])
            self.v[i] += self.b2 * (g * g - self.v[i])
            out.append(p - self.lr * self.m[i] / np.maximum(np.sqrt(self.v[i]), self.eps))
        return out
