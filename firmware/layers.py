"""How a frozen layer is laid out in the device's memories and described to its conv unit.

Memories hold words of ``C = array_cols`` lanes:

- activations: channels-last, each pixel padded to ``ceil(channels / C)`` words, so
  pixel (i, j) channel c is lane ``c % C`` of word ``base + (i*W + j)*G + c // C``;
- weights: for output group g (channels gC .. gC+C-1), K = kh*kw*C_in words in im2col
  order (i, j, c), lanes beyond C_out zero;
- biases: one word of C int32 lanes per output group.

A fully connected layer is a convolution whose kernel covers its whole input geometry,
so one address generator serves both, and the flattening order (i, j, c) is the walk of
the kernel. The conv unit walks output pixels in pooling order (every window's pixels
consecutive), which turns max-pooling into a running max over consecutive rows; the
compiler precomputes the four address steps of that walk (`steps`), so the hardware only
adds.
"""

import dataclasses
import math

import numpy as np
from amaranth import signed, unsigned
from amaranth.lib import data

__all__ = ["ConvDescriptor", "LayerPlan", "plan_layer", "plan_network", "pack_activations",
           "unpack_activations", "pack_weights", "pack_biases", "to_words", "from_words",
           "LayoutError"]

ADDR_BITS = 16

# One conv/fc layer, as the sequencer hands it to the conv unit.
ConvDescriptor = data.StructLayout({
    "in_h": unsigned(8), "in_w": unsigned(8),        # input geometry, pixels
    "cin": unsigned(12), "g_in": unsigned(8),        # channels, words per input pixel
    "kh": unsigned(8), "kw": unsigned(8),
    "pad_h": unsigned(4), "pad_w": unsigned(4),
    "k_row_step": unsigned(ADDR_BITS),               # word step from (ki, kw-1) to (ki+1, 0)
    "k_len": unsigned(16),                           # K = kh * kw * cin
    "m_pix": unsigned(16),                           # output pixels walked (pooled windows x P)
    "tiles": unsigned(12),                           # ceil(m_pix / R)
    "pool_h": unsigned(2), "pool_w": unsigned(2),
    "wp": unsigned(8),                               # pool windows per output row
    "step_ih": data.ArrayLayout(signed(10), 4),      # the walk's four steps, see `steps`
    "step_iw": data.ArrayLayout(signed(10), 4),
    "step_addr": data.ArrayLayout(signed(ADDR_BITS + 1), 4),
    "addr0": signed(ADDR_BITS + 1),                  # first input word of pixel 0 (may be < 0)
    "g_out": unsigned(8),
    "shift": unsigned(5), "relu": unsigned(1), "wide": unsigned(1),
    "in_base": unsigned(ADDR_BITS), "out_base": unsigned(ADDR_BITS),
    "w_base": unsigned(ADDR_BITS), "b_base": unsigned(ADDR_BITS),
})


class LayoutError(ValueError):
    """A layer that the conv unit or the memories of this configuration cannot hold."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer placed in memory: its descriptor fields and where its data goes."""
    fields: dict          # ConvDescriptor fields
    geometry: tuple       # (H, W, C) of the input as stored
    out_geometry: tuple   # (H, W, C) of the output as stored (pooled)
    in_words: int
    out_words: int
    w_words: int
    b_words: int


def steps(s, pool_h, pool_w, wp, in_w, g_in):
    """The four moves of the pooling-order walk of output pixels, as (d_ih, d_iw, d_addr):
    0 next column in the window, 1 next row in the window, 2 next window in the row,
    3 first window of the next row. ``d_addr`` moves the pixel's first input word."""
    moves = [(0, s), (s, -(pool_w - 1) * s), (-(pool_h - 1) * s, s), (s, -(wp * pool_w - 1) * s)]
    return [(dh, dw, (dh * in_w + dw) * g_in) for dh, dw in moves]


def plan_layer(layer, geometry, cfg, *, shift, wide, in_base=0, out_base=None, w_base=0,
               b_base=0):
    """Descriptor of ``layer`` (sim.network.Layer) reading an input stored with
    ``geometry`` = (H, W, C) at word ``in_base`` of the activation buffer. The output goes
    to ``out_base``; None puts it at the top of the activation buffer, or at 0 of the
    logit memory when ``wide``. Raises LayoutError when a limit is exceeded, including an
    output that overlaps the input."""
    R, C = cfg.array_rows, cfg.array_cols
    h, w, cin = geometry
    if layer.kind == "fc":
        if h * w * cin != layer.in_size:
            raise LayoutError(f"fc layer expects {layer.in_size} inputs, the buffer holds {h * w * cin}")
        kh, kw, pad_h, pad_w, s, ho, wo = h, w, 0, 0, 1, 1, 1
        pool_h = pool_w = 1
    else:
        if tuple(geometry) != tuple(layer.in_shape):
            raise LayoutError(f"conv layer expects input {layer.in_shape}, the buffer holds {geometry}")
        kh, kw = layer.kernel
        pad_h = 0 if layer.kind == "conv1d" else layer.pad
        pad_w = layer.pad
        s = layer.stride
        ho, wo, _ = layer.conv_shape
        pool_h = 1 if (layer.pool == 1 or layer.kind == "conv1d") else layer.pool
        pool_w = layer.pool
    if pool_h * pool_w > 1 and R % (pool_h * pool_w):
        raise LayoutError(f"pooling needs the array's {R} rows to hold whole windows")
    if not 0 <= shift <= 31:
        raise LayoutError(f"requantization shift {shift} is outside 0..31")
    hp, wp = ho // pool_h, wo // pool_w
    m_pix = hp * wp * pool_h * pool_w
    g_in, g_out = math.ceil(cin / C), math.ceil(layer.out_ch / C)
    k_len = kh * kw * cin
    in_words, out_words = h * w * g_in, hp * wp * g_out
    if out_base is None:
        out_base = 0 if wide else cfg.act_words - out_words
    fields = {
        "in_h": h, "in_w": w, "cin": cin, "g_in": g_in, "kh": kh, "kw": kw,
        "pad_h": pad_h, "pad_w": pad_w, "k_row_step": (w - kw + 1) * g_in,
        "k_len": k_len, "m_pix": m_pix, "tiles": math.ceil(m_pix / R),
        "pool_h": pool_h, "pool_w": pool_w, "wp": wp,
        "g_out": g_out, "shift": shift, "relu": int(layer.relu), "wide": int(wide),
        "in_base": in_base, "out_base": out_base, "w_base": w_base, "b_base": b_base,
    }
    fields["addr0"] = -(pad_h * w + pad_w) * g_in
    st = steps(s, pool_h, pool_w, wp, w, g_in)
    fields["step_ih"] = [d[0] for d in st]
    fields["step_iw"] = [d[1] for d in st]
    fields["step_addr"] = [d[2] for d in st]
    _check_fits(fields)
    _check_buffer(in_base, in_words, None if wide else out_base, out_words, cfg)
    if wide and out_base + out_words > math.ceil(cfg.max_classes / C):
        raise LayoutError(f"{hp * wp * layer.out_ch} logits exceed max_classes = {cfg.max_classes}")
    out_geometry = (hp, wp, layer.out_ch)
    return LayerPlan(fields, tuple(geometry), out_geometry, in_words=in_words,
                     out_words=out_words, w_words=g_out * k_len, b_words=g_out)


def _check_buffer(in_base, in_words, out_base, out_words, cfg):
    """The input, and an int8 output (``out_base`` not None), inside the activation
    buffer and apart."""
    spans = [(in_base, in_words, "input")]
    if out_base is not None:
        spans.append((out_base, out_words, "output"))
    for base, words, what in spans:
        if base < 0 or base + words > cfg.act_words:
            raise LayoutError(f"the layer's {what} needs words {base}..{base + words - 1}; "
                              f"the activation buffer has {cfg.act_words}")
    if out_base is not None and in_base < out_base + out_words and out_base < in_base + in_words:
        raise LayoutError(f"the layer needs {in_words + out_words} activation words for its "
                          f"input and output; they overlap in a buffer of {cfg.act_words}")


def _check_fits(fields):
    for name, field in ConvDescriptor:
        value = fields[name]
        shape = field.shape
        values = value if isinstance(value, list) else [value]
        if isinstance(shape, data.ArrayLayout):
            shape = shape.elem_shape
        lo = -(1 << (shape.width - 1)) if shape.signed else 0
        hi = (1 << (shape.width - 1)) - 1 if shape.signed else (1 << shape.width) - 1
        for v in values:
            if not lo <= v <= hi:
                raise LayoutError(f"layer field {name} = {v} does not fit the conv unit ({lo}..{hi})")


def plan_network(model, cfg, stack=False):
    """Plans of every layer of a QuantModel: weights and biases packed one after another,
    activations ping-ponging between the bottom and the top of the buffer, or with
    ``stack`` kept for the whole sample (what the adapters gather): layer 0's input at
    word 0, each layer's output just past its input."""
    plans = []
    geometry = tuple(model.layers[0].in_shape)
    w_base = b_base = in_base = 0
    for l, layer in enumerate(model.layers):
        last = l == len(model.layers) - 1
        if stack:
            h, w, c = geometry
            out_base = in_base + h * w * math.ceil(c / cfg.array_cols)
        else:
            # a layer reads where the previous one wrote and writes at the other end
            out_base = None if in_base == 0 else 0
        try:
            plan = plan_layer(layer, geometry, cfg, shift=model.shifts[l], wide=last,
                              in_base=in_base, out_base=None if last else out_base,
                              w_base=w_base, b_base=b_base)
        except LayoutError as exc:
            raise LayoutError(f"layer {l}: {exc}") from None
        plans.append(plan)
        w_base += plan.w_words
        b_base += plan.b_words
        geometry = plan.out_geometry
        in_base = plan.fields["out_base"]
    if w_base > cfg.weight_words // cfg.array_cols:
        raise LayoutError(f"weights need {w_base} words; the memory has {cfg.weight_words // cfg.array_cols}")
    if b_base > cfg.bias_words // cfg.array_cols:
        raise LayoutError(f"biases need {b_base} words; the memory has {cfg.bias_words // cfg.array_cols}")
    return plans


def to_words(lanes, width):
    """(n, cols) lane values -> n ints, lane j in bits [j*width, (j+1)*width)."""
    mask = (1 << width) - 1
    return [sum((int(v) & mask) << (j * width) for j, v in enumerate(row))
            for row in np.asarray(lanes, np.int64)]


def from_words(words, cols, width):
    """Inverse of `to_words` for signed lanes: n ints -> (n, cols) values."""
    mask, sign = (1 << width) - 1, 1 << (width - 1)
    return np.array([[(((int(w) >> (j * width)) & mask) ^ sign) - sign for j in range(cols)]
                     for w in words], np.int64).reshape(-1, cols)


def pack_activations(x, cols):
    """(H, W, Cin) ints -> (H*W*G, cols) words, channels padded with zeros."""
    x = np.asarray(x, np.int64)
    h, w, c = x.shape
    g = math.ceil(c / cols)
    out = np.zeros((h * w, g * cols), np.int64)
    out[:, :c] = x.reshape(h * w, c)
    return out.reshape(h * w * g, cols)


def unpack_activations(words, geometry, cols):
    """Inverse of `pack_activations`: (H*W*G, cols) words -> (H, W, C)."""
    h, w, c = geometry
    g = math.ceil(c / cols)
    return np.asarray(words, np.int64).reshape(h * w, g * cols)[:, :c].reshape(h, w, c)


def pack_weights(w, cols):
    """(K, Cout) im2col weights -> (G_out * K, cols) words, group-major."""
    w = np.asarray(w, np.int64)
    k, n = w.shape
    g = math.ceil(n / cols)
    padded = np.zeros((k, g * cols), np.int64)
    padded[:, :n] = w
    return padded.reshape(k, g, cols).transpose(1, 0, 2).reshape(g * k, cols)


def pack_biases(b, cols):
    """(Cout,) biases -> (G_out, cols) words."""
    b = np.asarray(b, np.int64)
    g = math.ceil(len(b) / cols)
    out = np.zeros(g * cols, np.int64)
    out[:len(b)] = b
    return out.reshape(g, cols)
