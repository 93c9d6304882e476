"""Bit-exact model of everything the accelerator computes. docs/numerics.md is its prose.

Every function takes and returns exact integers (int64 arrays). The frozen network is
`frozen_forward`; the adapters are `adapter_forward`, `loss_grad`, `adapter_grads` and
`update`; `cache_format` is the adapter-input format chosen by the cache width.
"""

import numpy as np

from .fixed import (saturate, rshift_round, requantize, imatmul, stochastic_rshift,
                    exp_table, bit_length)
from .network import im2col, maxpool

__all__ = ["quantize_input", "frozen_forward", "layer_forward", "cache_format", "compute_copy",
           "adapter_forward", "loss_grad", "argmax", "adapter_grads", "lr_mantissa",
           "init_moments", "update", "cache4_shift", "codes4"]


def quantize_input(model, x, cfg):
    """Float input tensor -> int8 at the model's input scale (round half up, saturate)."""
    q = np.floor(np.asarray(x, np.float64) * 2.0 ** model.s_x[0] + 0.5)
    return saturate(q, cfg.act_bits)


def frozen_forward(model, xq, cfg):
    """Run the frozen int8 network on int8 inputs (N, H, W, C).

    Returns (logits, xs): int16 logits at F_z, and xs[l], the flattened int8 input of
    every layer (what adapter l and the cache see)."""
    n = xq.shape[0]
    a = np.asarray(xq, dtype=np.int64)
    xs = []
    for l, layer in enumerate(model.layers):
        a = a.reshape((n,) + tuple(layer.in_shape))
        xs.append(a.reshape(n, -1))
        try:
            a = layer_forward(a, layer, model.weights[l], model.biases[l], model.shifts[l],
                              model.output_bits(l, cfg), cfg)
        except OverflowError as exc:
            raise OverflowError(f"layer {l}: {exc}") from None
    return a.reshape(n, -1), xs


def layer_forward(a, layer, weights, biases, shift, bits, cfg):
    """One frozen layer on int inputs (N, H, W, C): pool(relu(requantize(conv + bias)))
    to ``bits`` bits. Returns (N, Ho, Wo, C_out) after pooling."""
    n = a.shape[0]
    cols = im2col(np.asarray(a, np.int64), layer)
    acc = imatmul(cols.reshape(-1, cols.shape[-1]), weights) + biases
    acc_lim = 1 << (cfg.acc_bits - 1)
    if acc.max(initial=0) >= acc_lim or acc.min(initial=0) < -acc_lim:
        raise OverflowError(f"accumulator exceeds {cfg.acc_bits} bits")
    y = requantize(acc, shift, bits)
    if layer.relu:
        y = np.maximum(y, 0)
    ho, wo, c = layer.conv_shape
    return maxpool(y.reshape(n, ho, wo, c), layer)


def cache4_shift(x_int8, signed):
    """The 4-bit cache shift of one layer that minimizes the squared error on
    calibration activations. Candidates keep ``code << shift`` inside int8."""
    best, best_err = 0, None
    for shift in range(0, 5 if signed else 4):
        err = float(((_to4(x_int8, shift, signed) - x_int8) ** 2).sum())
        if best_err is None or err < best_err:
            best, best_err = shift, err
    return best


def codes4(x, shift, signed):
    """4-bit cache codes of int8 activations: clip(rshift_round(x, shift), lo, hi)."""
    lo, hi = (-8, 7) if signed else (0, 15)
    return np.clip(rshift_round(x, shift), lo, hi)


def _to4(x, shift, signed):
    return codes4(x, shift, signed) << shift


def cache_format(model, xs, bits):
    """The adapter inputs as a cache of ``bits`` (8 or 4) holds them: unchanged at 8
    bits; at 4 bits ``clip(rshift_round(x, c4), lo, hi) << c4`` per layer."""
    if bits == 8:
        return [np.asarray(x, np.int64) for x in xs]
    c4, signed = model.meta["cache4_shift"], model.meta["cache4_signed"]
    return [_to4(np.asarray(x, np.int64), c4[l], signed[l]) for l, x in enumerate(xs)]


def compute_copy(master, cfg):
    """int16 compute copy of int32 master weights: round-shift by F_m - F_w, saturate."""
    return requantize(master, cfg.F_m - cfg.F_w, cfg.adapter_bits)


def adapter_forward(model, xs, base, masters, cfg):
    """z = f(x) + sum_l (x_l A_l) B_l. ``masters`` is [(A_l, B_l)] int32 masters.

    Returns (z, hs): int16 logits at F_z and the int16 hidden h_l at F_h."""
    hs = []
    u = np.zeros_like(base, dtype=np.int64)
    for l, (x, (a, b)) in enumerate(zip(xs, masters)):
        h = requantize(imatmul(x, compute_copy(a, cfg)), model.s_x[l] + cfg.F_w - cfg.F_h, cfg.hidden_bits)
        hs.append(h)
        u = u + imatmul(h, compute_copy(b, cfg))
    z = saturate(base + rshift_round(u, cfg.F_h + cfg.F_w - cfg.F_z), cfg.logit_bits)
    return z, hs


def loss_grad(z, y, cfg):
    """softmax(z) - onehot(y) as int16 at F_g, through the exponential table and an
    integer reciprocal (docs/numerics.md, "Loss unit")."""
    table = exp_table(cfg.exp_entries, cfg.F_t, cfg.F_exp)
    z = np.asarray(z, np.int64)
    t = np.minimum(rshift_round(z.max(axis=1, keepdims=True) - z, cfg.F_z - cfg.F_t),
                   cfg.exp_entries - 1)
    e = table[t]
    total = e.sum(axis=1, keepdims=True)
    recip = (1 << cfg.recip_bits) // total
    p = rshift_round(e * recip, cfg.recip_bits - cfg.F_g)
    p[np.arange(len(y)), y] -= 1 << cfg.F_g
    return p


def argmax(z):
    """Index of the largest logit; ties go to the lowest index."""
    return np.asarray(z).argmax(axis=1)


def adapter_grads(model, xs, hs, g, masters, cfg):
    """Batch-summed gradient accumulators [(dA_l, dB_l)].

    dB_l = h_l^T g at F_h + F_g; e_l = g B_l^T requantized to int16 at F_e;
    dA_l = x_l^T e_l at s_x[l] + F_e. Accumulators are exact (docs/numerics.md)."""
    out = []
    for x, h, (_, b) in zip(xs, hs, masters):
        db = imatmul(h.T, g)
        e = requantize(imatmul(g, compute_copy(b, cfg).T), cfg.F_g + cfg.F_w - cfg.F_e, cfg.hidden_bits)
        da = imatmul(x.T, e)
        out.append((da, db))
    return out


def lr_mantissa(lr, cfg):
    """The learning rate as ``mant * 2**-exp`` with mant in [2**(bits-1), 2**bits)."""
    if not lr > 0:
        raise ValueError("learning rate must be positive")
    top = 1 << cfg.lr_mant_bits
    exp = 0
    while lr * 2.0 ** exp < top / 2:
        exp += 1
    while lr * 2.0 ** exp >= top:
        exp -= 1
    mant = int(np.floor(lr * 2.0 ** exp + 0.5))
    if mant == top:
        mant, exp = top // 2, exp - 1
    return mant, exp


def init_moments(masters):
    """Zero moments [(M_A, M_B)], [(V_A, V_B)]."""
    zero = [(np.zeros_like(a), np.zeros_like(b)) for a, b in masters]
    return zero, [(np.zeros_like(a), np.zeros_like(b)) for a, b in masters]


def _shift_adam(w, m, v, d, f_d, mant, exp, rand32, cfg):
    b1, b2 = cfg.beta1_shift, cfg.beta2_shift
    g = saturate(rshift_round(d, f_d - cfg.F_n), 32)
    # The moments carry b extra fraction bits (M = 2**b1 m, V = 2**b2 v), so that they
    # decay to within a fraction of an LSB of g instead of sticking a few LSBs away.
    m = saturate(m + g - rshift_round(m, b1), cfg.m_bits)
    g2 = rshift_round(g * g, 2 * cfg.F_n - cfg.F_v)
    v = np.clip(v + g2 - rshift_round(v, b2), 0, (1 << cfg.v_bits) - 1)
    # 2**e stands for sqrt(v): log2(sqrt(v)) rounded to an integer (ties up) from the
    # leading one of V, floored at e_min (the epsilon of Adam)
    e = np.maximum((bit_length(v) - cfg.F_v - b2) >> 1, cfg.e_min)
    shift = exp + e + cfg.F_n + b1 - cfg.F_m
    w = saturate(w - stochastic_rshift(m * mant, shift, rand32), cfg.master_bits)
    return w, m, v


def update(model, masters, moments, grads, lr, lfsr, cfg):
    """shift-Adam on the int32 master weights (docs/numerics.md, "Update"):

        g = sat32(round(dW >> (F_dW - F_n)))
        M = sat(M + g - round(M >> b1));  V = clip(V + round(g*g >> (2 F_n - F_v)) - round(V >> b2))
        e = max((bitlen(V) - F_v - b2) >> 1, e_min)
        W = sat32(W - SR(M * mant, exp + e + F_n + b1 - F_m))

    with one LFSR step per weight, in the order A_0, B_0, A_1, B_1, ... (row-major).
    Returns (masters, (m, v))."""
    mant, exp = lr_mantissa(lr, cfg)
    ms, vs = moments
    new_w, new_m, new_v = [], [], []
    for l in range(len(masters)):
        f_ds = (model.s_x[l] + cfg.F_e, cfg.F_h + cfg.F_g)
        out = [_shift_adam(masters[l][k], ms[l][k], vs[l][k], grads[l][k], f_ds[k], mant, exp,
                           lfsr.draws(masters[l][k].size).reshape(masters[l][k].shape), cfg)
               for k in (0, 1)]
        new_w.append((out[0][0], out[1][0]))
        new_m.append((out[0][1], out[1][1]))
        new_v.append((out[0][2], out[1][2]))
    return new_w, (new_m, new_v)
