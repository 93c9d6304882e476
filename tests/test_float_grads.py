"""Gradients of the float model against central finite differences, and against
PyTorch autograd where torch can be imported."""

import numpy as np
import pytest

from sim.baselines import he_init
from sim.float_model import FloatNet, ce_grad, adapter_logits, adapter_grads, softmax
from sim.network import Layer

NETS = {
    "conv2d": [Layer("conv2d", (6, 6, 2), 3, (3, 3), pad=1, relu=True, pool=2),
               Layer("conv2d", (3, 3, 3), 4, (3, 3), pad=1, stride=2, relu=True, pool=1),
               Layer("fc", (1, 1, 16), 5, relu=False)],
    "conv1d": [Layer("conv1d", (1, 12, 1), 3, (1, 3), pad=1, relu=True, pool=2),
               Layer("conv1d", (1, 6, 3), 2, (1, 3), pad=0, stride=2, relu=True, pool=1),
               Layer("fc", (1, 1, 4), 3, relu=False)],
}


def _central_diff(flat, i, loss, eps=1e-6):
    """d loss / d flat[i] by central differences (flat is a view into the parameters)."""
    old = flat[i]
    flat[i] = old + eps
    up = loss()
    flat[i] = old - eps
    down = loss()
    flat[i] = old
    return (up - down) / (2 * eps)


def _loss(net, x, y, weights=None):
    z, _ = net.forward(x, weights)
    p = softmax(z)
    return -np.log(p[np.arange(len(y)), y]).sum()


@pytest.mark.parametrize("name", sorted(NETS))
def test_network_gradients_against_finite_differences(name):
    layers = NETS[name]
    rng = np.random.default_rng(3)
    params = [(w, rng.normal(0, 0.1, b.shape)) for w, b in he_init(layers, 4)]
    net = FloatNet(layers, params)
    x = rng.normal(0, 1, (5,) + tuple(layers[0].in_shape))
    y = rng.integers(0, layers[-1].out_ch, 5)
    z, trace = net.forward(x)
    grads, dxs = net.backward(ce_grad(z, y), trace, need_input_grad=True)
    for l, (w, b) in enumerate(params):
        for arr, grad in ((w, grads[l][0]), (b, grads[l][1])):
            flat = arr.reshape(-1)
            for i in rng.choice(flat.size, min(12, flat.size), replace=False):
                num = _central_diff(flat, i, lambda: _loss(net, x, y))
                assert abs(num - grad.reshape(-1)[i]) <= 1e-5 * max(1.0, abs(num)), (l, i, num)
    # gradient of the network input
    flat = x.reshape(-1)
    for i in rng.choice(flat.size, 10, replace=False):
        assert abs(_central_diff(flat, i, lambda: _loss(net, x, y)) - dxs[0].reshape(-1)[i]) <= 1e-5


def _adapter_case(rng):
    sizes, rank, classes, n = (7, 5, 3), 2, 4, 6
    xs = [rng.normal(0, 1, (n, d)) for d in sizes]
    adapters = [(rng.normal(0, 0.5, (d, rank)), rng.normal(0, 0.5, (rank, classes))) for d in sizes]
    return xs, adapters, rng.normal(0, 1, (n, classes)), rng.integers(0, classes, n)


def test_adapter_gradients_against_finite_differences():
    rng = np.random.default_rng(8)
    xs, adapters, base, y = _adapter_case(rng)

    def loss():
        z, _ = adapter_logits(base, xs, adapters)
        return -np.log(softmax(z)[np.arange(len(y)), y]).sum()

    z, hs = adapter_logits(base, xs, adapters)
    grads = adapter_grads(xs, hs, ce_grad(z, y), adapters)
    for l, (a, b) in enumerate(adapters):
        for k, arr in enumerate((a, b)):
            flat = arr.reshape(-1)
            for i in range(flat.size):
                assert abs(_central_diff(flat, i, loss) - grads[l][k].reshape(-1)[i]) <= 1e-6


def _torch():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not importable (optional; .ci/run installs it from a local wheel if there is one)")
    return torch


def test_network_gradients_against_torch_autograd():
    torch = _torch()
    tf = torch.nn.functional
    layers = NETS["conv2d"]
    rng = np.random.default_rng(5)
    params = [(w, rng.normal(0, 0.1, b.shape)) for w, b in he_init(layers, 6)]
    x = rng.normal(0, 1, (4,) + tuple(layers[0].in_shape))
    y = rng.integers(0, 5, 4)
    z, trace = FloatNet(layers, params).forward(x)
    grads = FloatNet(layers, params).backward(ce_grad(z, y), trace)

    tw = [(torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)) for w, b in params]
    a = torch.tensor(x).permute(0, 3, 1, 2)                      # NHWC -> NCHW
    for layer, (w, b) in zip(layers, tw):
        if layer.kind == "fc":
            a = a.permute(0, 2, 3, 1).reshape(a.shape[0], -1) @ w + b
            continue
        kh, kw = layer.kernel
        # im2col rows are (i, j, c): (kh*kw*C, O) -> (O, C, kh, kw)
        weight = w.reshape(kh, kw, layer.in_shape[2], layer.out_ch).permute(3, 2, 0, 1)
        a = tf.conv2d(a, weight, b, stride=layer.stride, padding=layer.pad)
        if layer.relu:
            a = torch.relu(a)
        if layer.pool > 1:
            a = tf.max_pool2d(a, layer.pool)
    tz = a
    np.testing.assert_allclose(tz.detach().numpy(), z, rtol=1e-10, atol=1e-12)
    tf.cross_entropy(tz, torch.tensor(y), reduction="sum").backward()
    for (w, b), (dw, db) in zip(tw, grads):
        np.testing.assert_allclose(w.grad.numpy(), dw, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b.grad.numpy(), db, rtol=1e-9, atol=1e-12)


def test_adapter_gradients_against_torch_autograd():
    torch = _torch()
    rng = np.random.default_rng(9)
    xs, adapters, base, y = _adapter_case(rng)
    z, hs = adapter_logits(base, xs, adapters)
    grads = adapter_grads(xs, hs, ce_grad(z, y), adapters)
    ta = [(torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)) for a, b in adapters]
    tz = torch.tensor(base) + sum(torch.tensor(x) @ a @ b for x, (a, b) in zip(xs, ta))
    torch.nn.functional.cross_entropy(tz, torch.tensor(y), reduction="sum").backward()
    for (a, b), (da, db) in zip(ta, grads):
        np.testing.assert_allclose(a.grad.numpy(), da, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b.grad.numpy(), db, rtol=1e-10, atol=1e-12)
