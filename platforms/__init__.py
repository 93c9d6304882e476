"""FPGA boards: top levels, PLLs, the bitstream build and flashing (docs/board.md)."""

__all__ = ["BoardError"]


class BoardError(Exception):
    """A build or flash that cannot go on; the message is for the user, in one line."""
