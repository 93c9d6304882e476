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
from .finetune import batch_order, finetune_float, evaluate_float, float_optimizer

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


def finetune_baseline(method, model, x, y, schedule, cfg, evals):
    """Fine-tune with a float method under `schedule` and the device's update rule (its
    float twin, `MomentSGD`, on batch-summed gradients); returns the accuracy on each
    (x, y) of ``evals``."""
    if method == "skip2-lora":
        adapters = finetune_float(model, x, y, schedule, cfg)
        return [evaluate_float(model, adapters, xe, ye) for xe, ye in evals]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    layers = model.layers
    params = [(w.copy(), b.copy()) for w, b in model.float_params]
    lora = _lora_init(layers, schedule.rank, schedule.seed) if method == "lora-all" else None
    opt = float_optimizer(schedule, cfg)
    x = np.asarray(x, np.float64)

    def effective():
        if lora is None:
            return params
        return [(w + a @ b, bias) for (w, bias), (a, b) in zip(params, lora)]

    for _ in range(schedule.epochs):
        for idx in batch_order(len(y), schedule.batch, schedule.seed):
            net = FloatNet(layers, effective())
            z, trace = net.forward(x[idx])
            g = ce_grad(z, y[idx])
            if method == "ft-last":
                # the last layer's gradient needs no backward pass through the others
                dw = trace[-1]["cols"].reshape(len(idx), -1).T @ g
                w, b = opt.step(list(params[-1]), [dw, g.sum(axis=0)])
                params[-1] = (w, b)
                continue
            grads = net.backward(g, trace)
            if method == "ft-all":
                flat = opt.step([p for wb in params for p in wb], [d for dd in grads for d in dd])
                params = list(zip(flat[0::2], flat[1::2]))
            else:
                flat = opt.step([p for ab in lora for p in ab],
                                [d for (a, bm), (dw, _) in zip(lora, grads) for d in (dw @ bm.T, a.T @ dw)])
                lora = list(zip(flat[0::2], flat[1::2]))
    net = FloatNet(layers, effective())
    return [float((net.forward(np.asarray(xe, np.float64))[0].argmax(axis=1) == np.asarray(ye)).mean())
            for xe, ye in evals]
