"""The UART protocol's constants (docs/protocol.md): frame layout, commands, error codes,
and the registers IDENTIFY and STATUS read. The gateware's link (`gateware/link.py`) and
the host (`host/protocol.py`) both take them from here.
"""

import enum

from .memmap import Regs

__all__ = ["SYNC", "MAX_PAYLOAD", "MAX_WORDS", "WATCHDOG_BYTES", "HEADER_BYTES", "OVERHEAD_BYTES",
           "RESPONSE", "ERROR_CMD", "Command", "ErrorCode", "IDENTIFY_REGS", "STATUS_REGS"]

SYNC = 0xA5
MAX_PAYLOAD = 1028              # WRITE: address + 256 words
MAX_WORDS = 256                 # words of one WRITE or READ
WATCHDOG_BYTES = 64             # a frame that stops arriving this many byte times is dropped
HEADER_BYTES = 5                # sync, cmd, seq, len
OVERHEAD_BYTES = HEADER_BYTES + 2
RESPONSE = 0x80                 # a response's cmd is the request's | RESPONSE
ERROR_CMD = 0xFF                # ... or this, for an error response


class Command(enum.IntEnum):
    IDENTIFY = 0x01
    WRITE = 0x02
    READ = 0x03
    START = 0x04
    STATUS = 0x05
    ABORT = 0x06


class ErrorCode(enum.IntEnum):
    UNKNOWN_COMMAND = 1
    BAD_LENGTH = 2              # a bad length for the command, or a word count outside 1..256
    RUNNING = 3                 # running: only IDENTIFY, READ of REGS, STATUS, ABORT are served
    START_WHILE_RUNNING = 4


IDENTIFY_REGS = (Regs.ID, Regs.CONFIG_HASH, Regs.GEOMETRY)
STATUS_REGS = (Regs.STATUS, Regs.PC, Regs.INDEX, Regs.UPDATES, Regs.CYCLES, Regs.CYCLES_FROZEN,
               Regs.CYCLES_CACHED, Regs.CYCLES_INFER)
