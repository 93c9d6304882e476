"""Each fixed-point op against its float twin, within the tolerances of docs/numerics.md,
and the exact rules (rounding, saturation, LFSR) against hand-computed values."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gateware.config import DEFAULT as CFG
from sim.fixed import (saturate, rshift_round, requantize, imatmul, Lfsr, stochastic_rshift,
                       bit_length, exp_table, quantize_float)
from sim.fixed_model import (frozen_forward, compute_copy, adapter_forward, loss_grad, argmax,
                             adapter_grads, init_moments, update, lr_mantissa, codes4)
from sim.float_model import softmax, FloatNet
from sim.network import Layer
from sim.qmodel import QuantModel

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------- exact rules

def test_rshift_round_is_round_half_up():
    v = np.array([-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5])
    # v / 2 = -2.5 -2 -1.5 -1 -0.5 0 0.5 1 1.5 2 2.5, halves go up
    assert_array_equal(rshift_round(v, 1), [-2, -2, -1, -1, 0, 0, 1, 1, 2, 2, 3])
    assert_array_equal(rshift_round(v, 0), v)
    assert_array_equal(rshift_round(v, -2), v * 4)


def test_rshift_round_against_float():
    v = RNG.integers(-2**40, 2**40, 10000)
    for s in (1, 5, 13, 31):
        assert np.abs(rshift_round(v, s) - v / 2.0**s).max() <= 0.5


def test_saturate_and_requantize():
    assert_array_equal(saturate([-1000, -129, -128, 0, 127, 128, 1000], 8), [-128, -128, -128, 0, 127, 127, 127])
    assert_array_equal(requantize([2**20, -2**20, 255], 4, 8), [127, -128, 16])


def test_imatmul_is_exact_and_refuses_inexact_shapes():
    a = RNG.integers(-2**15, 2**15, (7, 300))
    b = RNG.integers(-2**15, 2**15, (300, 5))
    exact = np.array([[sum(int(x) * int(y) for x, y in zip(row, col)) for col in b.T] for row in a])
    assert_array_equal(imatmul(a, b), exact)
    with pytest.raises(OverflowError):
        imatmul(np.full((1, 4), 2**26), np.full((4, 1), 2**26))


def test_bit_length():
    v = np.array([0, 1, 2, 3, 4, 2**47 - 1, 2**47, 2**52 + 1])
    assert_array_equal(bit_length(v), [int(x).bit_length() for x in v])


def _gf2_matmul(a, b):
    """Product of 32x32 GF(2) matrices stored as lists of column bitmasks."""
    out = []
    for col in b:
        acc = 0
        for i in range(32):
            if col >> i & 1:
                acc ^= a[i]
        out.append(acc)
    return out


def _gf2_pow(m, e):
    result = [1 << i for i in range(32)]
    while e:
        if e & 1:
            result = _gf2_matmul(m, result)
        m = _gf2_matmul(m, m)
        e >>= 1
    return result


def test_lfsr_has_maximal_period():
    # The step is linear over GF(2): build its matrix from the images of the basis and
    # check that its order is exactly 2**32 - 1 (3 * 5 * 17 * 257 * 65537).
    cols = []
    for i in range(32):
        lf = Lfsr(1 << i, CFG.lfsr_taps)
        cols.append(lf.step())
    identity = [1 << i for i in range(32)]
    n = 2**32 - 1
    assert _gf2_pow(cols, n) == identity
    for p in (3, 5, 17, 257, 65537):
        assert _gf2_pow(cols, n // p) != identity, f"period divides (2^32-1)/{p}"


def test_lfsr_sequence_and_draws_agree():
    a, b = Lfsr(0xDEADBEEF), Lfsr(0xDEADBEEF)
    seq = [a.step() for _ in range(100)]
    assert_array_equal(b.draws(100), seq)
    # first step by hand: lsb of 0xDEADBEEF is 1
    assert seq[0] == (0xDEADBEEF >> 1) ^ 0x80200003
    assert Lfsr(0).state == 1


def test_stochastic_rounding_is_unbiased_and_bounded():
    lf = Lfsr(99)
    v = np.full(200000, -7)              # -7 / 16 = -0.4375
    out = stochastic_rshift(v, 4, lf.draws(len(v)))
    assert set(np.unique(out)) == {-1, 0}
    assert abs(out.mean() - (-7 / 16)) < 0.005
    # negative and zero shifts are exact
    assert_array_equal(stochastic_rshift([3, -3], np.array([-2, 0]), [0, 0]), [12, -3])


def test_exp_table_and_lr_mantissa():
    t = exp_table(CFG.exp_entries, CFG.F_t, CFG.F_exp)
    assert t[0] == 2**CFG.F_exp and t.max() < 2**16 and (np.diff(t) <= 0).all()
    assert np.abs(t / 2.0**CFG.F_exp - np.exp(-np.arange(len(t)) / 2.0**CFG.F_t)).max() <= 2.0**-(CFG.F_exp + 1)
    for lr in (1e-5, 0.003, 0.01, 0.5, 3.0):
        mant, exp = lr_mantissa(lr, CFG)
        assert 2**15 <= mant < 2**16
        assert abs(mant * 2.0**-exp / lr - 1) <= 2.0**-16


# ---------------------------------------------------------------- ops against float twins

def _random_layer_model(layer, rng, s_x=5, s_w=6, last=False):
    """A one-layer model, or with ``last=False`` that layer followed by a small fc, so
    that its output is an int8 hidden activation (the next layer's input). The shift
    maps the accumulator's spread (about 128*128*sqrt(fan_in)/3) to about +-30."""
    s_y = s_x + s_w - int(np.ceil(np.log2(128 * 128 * np.sqrt(layer.fan_in) / 3 / 30)))
    w = rng.integers(-128, 128, (layer.fan_in, layer.out_ch))
    b = rng.integers(-2**10, 2**10, layer.out_ch)
    layers, ws, bs = [layer], [w], [b]
    s_xs, s_ws, s_ys = [s_x], [s_w], [CFG.F_z if last else s_y]
    fp = [(w / 2.0**s_w, b / 2.0**(s_x + s_w))]
    if not last:
        tail = Layer("fc", (1, 1, layer.out_size), 2, relu=False)
        layers.append(tail)
        ws.append(np.ones((layer.out_size, 2), np.int64))
        bs.append(np.zeros(2, np.int64))
        s_xs.append(s_y), s_ws.append(0), s_ys.append(CFG.F_z)
        fp.append((np.ones((layer.out_size, 2)), np.zeros(2)))
    return QuantModel("t", layers, ws, bs, s_xs, s_ws, s_ys, fp, 2 if not last else layer.out_ch)


LAYERS = [
    Layer("conv2d", (8, 8, 1), 8, (3, 3), pad=1, relu=True, pool=2),
    Layer("conv2d", (7, 9, 3), 5, (3, 3), pad=1, stride=2, relu=True, pool=1),
    Layer("conv2d", (5, 5, 4), 6, (3, 3), pad=0, relu=False, pool=2),
    Layer("conv1d", (1, 33, 2), 4, (1, 3), pad=1, relu=True, pool=2),
    Layer("conv1d", (1, 16, 1), 3, (1, 3), pad=1, stride=2, relu=True, pool=1),
    Layer("fc", (1, 1, 37), 11, relu=True),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l.kind}-{l.in_shape}-s{l.stride}-p{l.pool}")
def test_frozen_layer_within_half_lsb_of_float(layer):
    """Tolerance: |fixed - float| <= 2**-(s_y + 1) where the output is not saturated."""
    rng = np.random.default_rng(hash(layer) % 2**32)
    model = _random_layer_model(layer, rng)
    x = rng.integers(-128, 128, (16,) + tuple(layer.in_shape))
    _, xs = frozen_forward(model, x, CFG)
    assert_array_equal(xs[0], x.reshape(16, -1))
    out = xs[1]
    ref, _ = FloatNet([layer], model.float_params[:1]).forward(x / 2.0**model.s_x[0])
    ref = ref * 2.0**model.s_y[0]
    free = np.abs(ref) < 127
    assert free.mean() > 0.5, "test data saturates too much to say anything"
    assert np.abs(out[free] - ref[free]).max() <= 0.5
    assert (out[~free] == np.where(ref[~free] > 0, 127, -128)).all()


def test_last_layer_gives_int16_logits():
    layer = Layer("fc", (1, 1, 40), 10, relu=False)
    rng = np.random.default_rng(5)
    model = _random_layer_model(layer, rng, last=True)
    x = rng.integers(-128, 128, (8, 1, 1, 40))
    out, _ = frozen_forward(model, x, CFG)
    ref = FloatNet([layer], model.float_params).forward(x / 2.0**model.s_x[0])[0] * 2.0**CFG.F_z
    assert np.abs(out).max() > 127                     # wider than int8
    assert np.abs(out - np.clip(ref, -32768, 32767)).max() <= 0.5


def test_frozen_accumulator_overflow_is_refused():
    layer = Layer("fc", (1, 1, 4), 1, relu=False)
    w = np.full((4, 1), 127)
    model = QuantModel("t", [layer], [w], [np.array([2**31 - 2])], [0], [0], [0], [(w, np.zeros(1))], 1)
    with pytest.raises(OverflowError):
        frozen_forward(model, np.full((1, 1, 1, 4), 127), CFG)
    # the int32 range itself is accepted, down to -2**31 exactly
    w = np.full((1, 1), -128)
    model = QuantModel("t", [layer.__class__("fc", (1, 1, 1), 1, relu=False)], [w],
                       [np.array([-2**31 + 128 * 127])], [0], [0], [0], [(w, np.zeros(1))], 1)
    out, _ = frozen_forward(model, np.full((1, 1, 1, 1), 127), CFG)
    assert out[0, 0] == -2**15


def test_loss_unit_within_2_pow_minus_8_of_float():
    """Tolerance: |g - (softmax(z) - onehot(y))| <= 2**-8 (measured: 0.0022)."""
    rng = np.random.default_rng(7)
    for scale in (0.3, 3, 30):
        z = np.clip(np.floor(rng.normal(0, scale, (5000, 10)) * 2**CFG.F_z + 0.5), -32768, 32767).astype(np.int64)
        y = rng.integers(0, 10, 5000)
        g = loss_grad(z, y, CFG)
        ref = softmax(z / 2.0**CFG.F_z)
        ref[np.arange(5000), y] -= 1
        assert np.abs(g / 2.0**CFG.F_g - ref).max() <= 2**-8


def test_loss_unit_extremes():
    one = 1 << CFG.F_g
    # all equal: p = 1/C each
    g = loss_grad(np.zeros((1, 10), np.int64), np.array([3]), CFG)
    assert np.abs(g[0, [0, 1, 2, 4]] - one / 10).max() <= 2 and abs(g[0, 3] - (one / 10 - one)) <= 2
    # one huge logit, saturated extremes: p = onehot, g = 0 on the right class
    z = np.full((2, 10), -32768)
    z[:, 4] = 32767
    g = loss_grad(z, np.array([4, 0]), CFG)
    assert_array_equal(g[0], np.zeros(10))
    assert g[1, 0] == -one and g[1, 4] == one
    assert (np.abs(g) <= one).all()


def test_argmax_ties_go_to_lowest_index():
    assert_array_equal(argmax(np.array([[1, 5, 5, 2], [0, 0, 0, 0]])), [1, 0])


def _adapter_setup(rng, sizes=(64, 128, 64, 32), rank=4, classes=10, n=20):
    layers = [Layer("fc", (1, 1, d), 1) for d in sizes]
    model = QuantModel("t", layers, [None] * 4, [None] * 4, [6, 4, 4, 3], [0] * 4, [0] * 4, [], classes)
    xs = [rng.integers(0, 128, (n, d)) for d in sizes]
    masters = [(quantize_float(rng.uniform(-1, 1, (d, rank)) / np.sqrt(d), CFG.F_m, 32),
                quantize_float(rng.normal(0, 0.3, (rank, classes)), CFG.F_m, 32)) for d in sizes]
    base = rng.integers(-2000, 2000, (n, classes))
    return model, xs, masters, base


def test_compute_copy_rounds_and_saturates():
    m = np.array([0, 2**11, 2**11 - 1, -2**11, 2**31 - 1, -2**31])
    assert_array_equal(compute_copy(m, CFG), [0, 1, 0, 0, 32767, -32768])


def test_adapter_forward_within_rounding_bound_of_float():
    """Tolerance: |z - z_float| <= 2**-(F_z+1) + sum_l sum_k 2**-(F_h+1) * |B_l[k, c]| with the
    float twin computed from the same int8 inputs and the int16 compute copies."""
    rng = np.random.default_rng(11)
    model, xs, masters, base = _adapter_setup(rng)
    z, hs = adapter_forward(model, xs, base, masters, CFG)
    zf = base / 2.0**CFG.F_z
    bound = 2.0**-(CFG.F_z + 1)
    for l, (x, (a, b)) in enumerate(zip(xs, masters)):
        af, bf = compute_copy(a, CFG) / 2.0**CFG.F_w, compute_copy(b, CFG) / 2.0**CFG.F_w
        hf = (x / 2.0**model.s_x[l]) @ af
        assert np.abs(hs[l] / 2.0**CFG.F_h - hf).max() <= 2.0**-(CFG.F_h + 1)
        zf = zf + hf @ bf
        bound = bound + 2.0**-(CFG.F_h + 1) * np.abs(bf).sum(axis=0)
    assert (np.abs(z / 2.0**CFG.F_z - zf) <= bound).all()
    assert np.abs(z / 2.0**CFG.F_z - zf).max() > 0      # the check sees rounding at all


def test_adapter_gradients_match_float_directions():
    """Tolerance: cosine similarity >= 0.999 between fixed and float batch gradients."""
    rng = np.random.default_rng(12)
    model, xs, masters, base = _adapter_setup(rng)
    z, hs = adapter_forward(model, xs, base, masters, CFG)
    y = rng.integers(0, 10, len(base))
    g = loss_grad(z, y, CFG)
    grads = adapter_grads(model, xs, hs, g, masters, CFG)
    gf = softmax(z / 2.0**CFG.F_z)
    gf[np.arange(len(y)), y] -= 1
    for l, (x, (a, b)) in enumerate(zip(xs, masters)):
        xf = x / 2.0**model.s_x[l]
        af, bf = compute_copy(a, CFG) / 2.0**CFG.F_w, compute_copy(b, CFG) / 2.0**CFG.F_w
        hf = xf @ af
        ref = (xf.T @ (gf @ bf.T), hf.T @ gf)
        scales = (model.s_x[l] + CFG.F_e, CFG.F_h + CFG.F_g)
        for k in (0, 1):
            got = grads[l][k] / 2.0**scales[k]
            cos = (got * ref[k]).sum() / np.linalg.norm(got) / np.linalg.norm(ref[k])
            assert cos >= 0.999, (l, k, cos)
            assert np.abs(got - ref[k]).max() <= 0.01 * np.abs(ref[k]).max() + 2.0**-8


def test_shift_adam_step_against_float_twin():
    """One update from zero moments against the same rule in float with the square
    root rounded to the same power of two. Tolerance per weight:
    2 * 2**-F_m + lr * 2**-e * 2**-(F_n + b1 + 1) (the stochastic rounding of the step,
    and the rounding of g to F_n seen through m = g / 2**b1 and the normalization)."""
    rng = np.random.default_rng(13)
    model, xs, masters, base = _adapter_setup(rng)
    z, hs = adapter_forward(model, xs, base, masters, CFG)
    g = loss_grad(z, rng.integers(0, 10, len(base)), CFG)
    grads = adapter_grads(model, xs, hs, g, masters, CFG)
    lr = 0.01
    new, (ms, vs) = update(model, masters, init_moments(masters), grads, lr, Lfsr(5), CFG)
    b1, b2 = CFG.beta1_shift, CFG.beta2_shift
    for l in range(4):
        scales = (model.s_x[l] + CFG.F_e, CFG.F_h + CFG.F_g)
        for k in (0, 1):
            gr = grads[l][k] / 2.0**scales[k]
            mf = gr * 2.0**-b1
            vf = gr * gr * 2.0**-b2
            # the power of two the device uses, from the leading one of its V
            e = np.maximum((bit_length(vs[l][k]) - CFG.F_v - b2) >> 1, CFG.e_min).astype(float)
            step = lr * mf * 2.0**-e
            got = (masters[l][k] - new[l][k]) / 2.0**CFG.F_m
            tol = 2 * 2.0**-CFG.F_m + lr * 2.0**-e * 2.0**-(CFG.F_n + b1 + 1)
            assert (np.abs(got - step) <= tol).all()
            assert np.abs(got - step).max() > 0
            # the power of two is within sqrt(2) of the true root, or the floor e_min
            root = np.sqrt(vf)
            big = root > 2.0**(CFG.e_min + 1)
            ratio = 2.0**e[big] / root[big]
            assert big.any() and ((ratio >= 0.7) & (ratio <= 1.42)).all()
            assert (e[~big] <= CFG.e_min + 1).all()


def test_shift_adam_moments_decay_to_zero():
    """With the gradient gone, M decays to within 4 LSB (at F_n + b1) of zero, so the
    weight's residual drift is at most lr * 4 * 2**-(F_n + b1) * 2**-e_min = lr / 32
    per update (docs/numerics.md); without the extra fraction bits it was up to 19 lr."""
    model, xs, masters, base = _adapter_setup(np.random.default_rng(15), sizes=(8,), n=4)
    grads = [(np.full_like(masters[0][0], 3 << 10), np.full_like(masters[0][1], -(5 << 10)))]
    zero = [(np.zeros_like(masters[0][0]), np.zeros_like(masters[0][1]))]
    w, mom = update(model, masters, init_moments(masters), grads, 0.01, Lfsr(3), CFG)
    lf = Lfsr(4)
    for _ in range(400):
        w, mom = update(model, w, mom, zero, 0.01, lf, CFG)
    m, v = mom
    assert np.abs(m[0][0]).max() <= 4 and np.abs(m[0][1]).max() <= 4
    before = [x.copy() for x in w[0]]
    w, mom = update(model, w, mom, zero, 0.01, lf, CFG)
    moved = max(np.abs(a - b).max() for a, b in zip(w[0], before))
    bound = 0.01 * 4 * 2.0**-(CFG.F_n + CFG.beta1_shift) * 2.0**-CFG.e_min * 2**CFG.F_m
    assert moved <= bound + 1


def test_update_saturates_masters():
    rng = np.random.default_rng(14)
    model, xs, masters, base = _adapter_setup(rng, sizes=(8,), n=4)
    masters = [(np.full_like(masters[0][0], 2**31 - 1), masters[0][1])]
    grads = [(np.full_like(masters[0][0], -2**30), np.zeros_like(masters[0][1]))]
    new, _ = update(model, masters, init_moments(masters), grads, 100.0, Lfsr(1), CFG)
    assert (new[0][0] == 2**31 - 1).all()


def test_cache_codes4():
    x = np.array([-128, -9, -1, 0, 3, 4, 60, 127])
    assert_array_equal(codes4(x, 4, True), [-8, -1, 0, 0, 0, 0, 4, 7])
    assert_array_equal(codes4(x, 3, False), [0, 0, 0, 0, 0, 1, 8, 15])
