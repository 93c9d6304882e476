"""How the blocks' memories meet the ECP5: shallow wide ones in LUT RAM, and the
register that follows a block RAM read.
"""

from amaranth.hdl import Signal

__all__ = ["LUT_RAM_DEPTH", "ram_style", "read_register"]

# Memories at most this deep and wider than a DP16KD port go to LUT RAM (``ram_style``):
# in block RAM they would fill a fraction of each of several DP16KD.
LUT_RAM_DEPTH = 128


def ram_style(depth):
    """The ``attrs`` of a `Memory` wider than a DP16KD port: LUT RAM when at most
    `LUT_RAM_DEPTH` deep, else None (yosys chooses)."""
    return {"ram_style": "distributed"} if depth <= LUT_RAM_DEPTH else None


def read_register(m, port, name):
    """``port``'s word in a register loaded when the port reads (every cycle for a port
    whose enable is left at 1): the register the build makes the block RAM's own output
    register (`platforms.outreg`), which takes a clock-to-out of 5.6-5.8 ns to 0.96 ns.

    It has no reset and takes the word straight from the port, as the pass requires;
    whatever logic the word goes through belongs after it."""
    q = Signal.like(port.data, name=name, reset_less=True)
    with m.If(port.en):
        m.d.sync += q.eq(port.data)
    return q
