"""Float training: pretraining of base models and the fine-tuning baselines.

Methods (all float64, same batches as `sim.finetune`):

- ``ft-last``: fine-tune the last layer's weights and bias only;
- ``ft-all``: fine-tune every weight and bias, back-propagating through the network;
- ``lora-all``: classic LoRA inside every layer, ``W + A B``, back-propagating through
  the network;
- ``skip2-lora``: adapters from every layer's input to the logits (`sim.finetune`).
"""

import numpy as np

from .float_model import FloatNet, ce_grad
from .finetune import batch_order, finetune_float, evaluate_float

__all__ = ["he_init", "pretrain", "finetune_baseline", "METHODS"]

METHODS = ("ft-last", "ft-all", "lora-all", "skip2-lora")


def he_init(layers, seed):
    rng = np.random.default_rng(seed)
    return [(rng.normal(0.0, np.sqrt(2.0 / layer.fan_in), (layer.fan_in, layer.out_ch)),
             np.zeros(layer.out_ch)) for layer in layers]


class _Adam:
    def __init__(self, shapes, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = [np.zeros(s) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]

    def step(self, params, grads):
        self.t += 1
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            mh = self.m[i] / (1 - self.b1 ** self.t)
            vh = self.v[i] / (1 - self.b2 ** self.t)
            out.append(p - self.lr * mh / (np.sqrt(vh) + self.eps))
        return out


def pretrain(layers, x, y, epochs, batch, lr, seed, weight_decay=1e-4, progress=None):
    """Deterministic Adam training of a float network from He initialization."""
    params = he_init(layers, seed)
    flat = [p for wb in params for p in wb]
    opt = _Adam([p.shape for p in flat], lr)
    rng = np.random.default_rng(seed)
    n = len(y)
    for epoch in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            net = FloatNet(layers, params)
            z, trace = net.forward(x[idx])
            grads = net.backward(ce_grad(z, y[idx]) / len(idx), trace)
            gflat = [g + weight_decay * p for (dw, db), (w, b) in zip(grads, params)
                     for g, p in ((dw, w), (db, b))]
            flat = opt.step(flat, gflat)
            params = [(flat[2 * k], flat[2 * k + 1]) for k in range(len(layers))]
        if progress:
            progress(epoch + 1, epochs)
    return params


def _lora_init(layers, rank, seed):
    rng = np.random.default_rng(seed)
    return [(rng.uniform(-1, 1, (layer.fan_in, rank)) / np.sqrt(layer.fan_in),
             np.zeros((rank, layer.out_ch))) for layer in layers]


def finetune_baseline(method, model, x, y, schedule, cfg, x_eval, y_eval):
    """Fine-tune with a float method under `schedule` (plain SGD, mean gradient);
    returns the accuracy on (x_eval, y_eval)."""
    if method == "skip2-lora":
        return evaluate_float(model, finetune_float(model, x, y, schedule, cfg), x_eval, y_eval)
    layers = model.layers
    params = [(w.copy(), b.copy()) for w, b in model.float_params]
    lora = _lora_init(layers, schedule.rank, schedule.seed) if method == "lora-all" else None
    x = np.asarray(x, np.float64)
    for _ in range(schedule.epochs):
        for idx in batch_order(len(y), schedule.batch, schedule.seed):
            weights = params if lora is None else [(w + a @ b, bias) for (w, bias), (a, b) in zip(params, lora)]
            net = FloatNet(layers, weights)
            z, trace = net.forward(x[idx])
            step = schedule.lr / len(idx)
            g = ce_grad(z, y[idx])
            if method == "ft-last":
                # the last layer's gradient needs no backward pass through the others
                t = trace[-1]
                dw = t["cols"].reshape(len(idx), -1).T @ g
                w, b = params[-1]
                params[-1] = (w - step * dw, b - step * g.sum(axis=0))
                continue
            grads = net.backward(g, trace)
            if method == "ft-all":
                params = [(w - step * dw, b - step * db) for (w, b), (dw, db) in zip(params, grads)]
            elif method == "lora-all":
                lora = [(a - step * dw @ bm.T, bm - step * a.T @ dw)
                        for (a, bm), (dw, _) in zip(lora, grads)]
            else:
                raise ValueError(f"unknown method {method!r}")
    weights = params if lora is None else [(w + a @ b, bias) for (w, bias), (a, b) in zip(params, lora)]
    z, _ = FloatNet(layers, weights).forward(np.asarray(x_eval, np.float64))
    return float((z.argmax(axis=1) == np.asarray(y_eval)).mean())
