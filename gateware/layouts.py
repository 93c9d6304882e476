"""Stream payloads between the blocks, in one place.

Every stream is `amaranth.lib.stream` with one of these `data.StructLayout` payloads;
`last` marks the end of a packet (a tile, a pixel row group, a sample).
"""

from amaranth import signed, unsigned
from amaranth.utils import bits_for, ceil_log2
from amaranth.lib import data

from firmware.isa import FSHIFT_BITS

__all__ = ["feed_layout", "result_layout", "conv_out_layout", "class_bits", "loss_in_layout",
           "loss_out_layout", "index_bits", "fill_layout", "request_layout", "read_layout",
           "sample_layout", "DW_BITS", "FSHIFT_BITS", "update_in_layout", "update_out_layout"]


def feed_layout(rows, cols, width=8):
    """One reduction step of a tile, entering the systolic array: column ``k`` of the
    A tile (``a[r]`` = A[m0 + r, k]) and row ``k`` of the B tile (``b[c]`` = B[k, n0 + c]).
    ``last`` marks the final step of the tile's reduction."""
    return data.StructLayout({
        "a": data.ArrayLayout(signed(width), rows),
        "b": data.ArrayLayout(signed(width), cols),
        "last": unsigned(1),
    })


def result_layout(cols, width=32):
    """One row of a finished tile leaving the array: ``c[j]`` = C[m0 + r, n0 + j]. Rows
    leave in order r = 0 .. rows-1; ``last`` marks row rows-1."""
    return data.StructLayout({
        "c": data.ArrayLayout(signed(width), cols),
        "last": unsigned(1),
    })


def conv_out_layout(cols, width, addr_bits):
    """One word of a layer's output: ``cols`` requantized channels of one (pooled)
    pixel, to be written at word address ``addr``; ``last`` marks the layer's final word."""
    return data.StructLayout({
        "addr": unsigned(addr_bits),
        "data": data.ArrayLayout(signed(width), cols),
        "last": unsigned(1),
    })


def class_bits(cfg):
    """Bits of a class index."""
    return max(1, ceil_log2(cfg.max_classes))


def loss_in_layout(cfg):
    """One logit entering the loss unit. A sample is one beat per class, in class order
    0 .. C-1 (1 <= C <= ``max_classes``); ``first`` marks class 0 and ``last`` class C-1.
    ``label`` is the sample's true class, the same on every beat."""
    return data.StructLayout({
        "z": signed(cfg.logit_bits),            # logit at F_z
        "label": unsigned(class_bits(cfg)),
        "first": unsigned(1),
        "last": unsigned(1),
    })


def loss_out_layout(cfg):
    """One gradient leaving the loss unit, one beat per class in class order: ``g`` (int16 at
    F_g) of class ``cls``. ``pred`` (argmax, ties to the lowest index) and ``correct``
    (``pred == label``) belong to the whole sample and are valid on every beat."""
    return data.StructLayout({
        "g": signed(16),
        "cls": unsigned(class_bits(cfg)),
        "pred": unsigned(class_bits(cfg)),
        "correct": unsigned(1),
        "first": unsigned(1),
        "last": unsigned(1),
    })


# Activation cache (gateware/cache.py)


def index_bits(cfg):
    """Width of a sample index: any uploaded sample, and at least one past capacity."""
    return max(bits_for(cfg.max_samples - 1), bits_for(cfg.cache_samples))


def fill_layout(cfg):
    return data.StructLayout({
        "index": unsigned(index_bits(cfg)),
        "data":  signed(cfg.logit_bits),
        "first": unsigned(1),
        "last":  unsigned(1),
    })


def request_layout(cfg):
    return data.StructLayout({
        "index": unsigned(index_bits(cfg)),
        "count": unsigned(1),
    })


def read_layout(cfg):
    return data.StructLayout({
        "data":  signed(cfg.logit_bits),
        "logit": unsigned(1),
        "hit":   unsigned(1),
        "first": unsigned(1),
        "last":  unsigned(1),
    })


# Adapter datapath (gateware/adapter.py)


def sample_layout(cfg):
    """One beat of a sample, in the order the activation cache returns it: the ``sum_l
    d_l`` adapter inputs (``data`` = the int8 value, sign-extended) layer by layer, then
    the C base logits (``data`` = int16 at F_z). ``label`` (the true class) is read on the
    last logit. ``first``/``last`` frame the packet for other consumers; this unit counts
    the beats from ``setup`` and does not read them."""
    return data.StructLayout({
        "data": signed(cfg.logit_bits),
        "label": unsigned(class_bits(cfg)),
        "first": unsigned(1),
        "last": unsigned(1),
    })


# Update unit (gateware/update.py)

# Batch-summed gradient accumulator entering the unit. docs/numerics.md section 8 bounds
# |dA_l| by 2^30 (32 bits signed) and |dB_l| by 2^37 (39 bits signed) for every schedule
# check_limits admits; 48 bits leave 9 bits of headroom for larger limits.
DW_BITS = 48


def update_in_layout(cfg):
    """One weight entering the update unit, in the order A_0, B_0, A_1, B_1, ... (each
    row-major). ``fshift`` is ``f_d - F_n`` of the weight's tensor (``s_x[l] + F_e - F_n``
    for ``A_l``, ``F_h + F_g - F_n`` for ``B_l``); ``last`` marks the update's last weight
    and is passed through."""
    return data.StructLayout({
        "w": signed(cfg.master_bits),       # master weight at F_m
        "m": signed(cfg.m_bits),            # first moment at F_n + beta1_shift
        "v": unsigned(cfg.v_bits),          # second moment at F_v + beta2_shift
        "d": signed(DW_BITS),               # batch-summed gradient at f_d
        "fshift": signed(FSHIFT_BITS),      # f_d - F_n
        "last": unsigned(1),
    })


def update_out_layout(cfg):
    """One updated weight leaving the unit, in the input's order."""
    return data.StructLayout({
        "w": signed(cfg.master_bits),
        "m": signed(cfg.m_bits),
        "v": unsigned(cfg.v_bits),
        "last": unsigned(1),
    })
