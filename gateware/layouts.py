"""Stream payloads between the blocks, in one place.

Every stream is `amaranth.lib.stream` with one of these `data.StructLayout` payloads;
`last` marks the end of a packet (a tile, a pixel row group, a sample).
"""

from amaranth import signed, unsigned
from amaranth.utils import ceil_log2
from amaranth.lib import data

__all__ = ["feed_layout", "result_layout", "conv_out_layout", "loss_in_layout", "loss_out_layout"]


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
