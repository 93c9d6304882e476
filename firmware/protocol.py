"""The UART protocol's constants (docs/protocol.md): frame layout, commands, error codes,
the registers IDENTIFY and STATUS read, the regions that hold the frozen model
(`MODEL_REGIONS`, whose WRITEs clear the device's model flag), and the address ranges a
WRITE or READ may reach (`windows`, `address_ok`). The gateware's link (`gateware/link.py`) and the host
(`host/protocol.py`) both take them from here.
"""

import dataclasses
import enum
import functools

from .memmap import (OFFSET_BITS, PORT_ADDR_BITS, WRITABLE, Region, Regs, chunk_bits,
                     region_words, word_bits)

__all__ = ["SYNC", "MAX_PAYLOAD", "MAX_WORDS", "WATCHDOG_BYTES", "HEADER_BYTES", "CRC_BYTES", "OVERHEAD_BYTES",
           "RESPONSE", "ERROR_CMD", "Command", "ErrorCode", "IDENTIFY_REGS", "STATUS_REGS", "STATUS_WORDS",
           "MODEL_REGIONS",
           "Window",
           "windows", "address_ok"]

SYNC = 0xA5
MAX_PAYLOAD = 1028              # WRITE: address + 256 words
MAX_WORDS = 256                 # words of one WRITE or READ
WATCHDOG_BYTES = 64             # a frame that stops arriving this many byte times is dropped
HEADER_BYTES = 5                # sync, cmd, seq, len
# CRC-32 (IEEE 802.3, reflected; zlib.crc32): at 1 % faults per byte a CRC-16 let one
# damaged frame in 65536 through, about one wrong WRITE per few dozen fine-tunes
CRC_BYTES = 4
OVERHEAD_BYTES = HEADER_BYTES + CRC_BYTES
RESPONSE = 0x80                 # a response's cmd is the request's | RESPONSE
ERROR_CMD = 0xFF                # ... or this, for an error response


class Command(enum.IntEnum):
    IDENTIFY = 0x01
    WRITE = 0x02
    READ = 0x03
    START = 0x04
    STATUS = 0x05
    ABORT = 0x06
    LOADED = 0x07               # the frozen model is in WEIGHTS and BIASES: sets the model flag


class ErrorCode(enum.IntEnum):
    UNKNOWN_COMMAND = 1
    BAD_LENGTH = 2              # a bad length for the command, or a word count outside 1..256
    RUNNING = 3                 # running: only IDENTIFY, READ of REGS, STATUS, ABORT are served
    START_WHILE_RUNNING = 4
    BAD_ADDRESS = 5             # a WRITE or READ reaching outside one region's memory
    NO_MODEL = 6                # START with the model flag clear: no whole model loaded


# The device's model flag (docs/protocol.md, "The model flag"): cleared at reset and by
# every WRITE served to these regions, set by LOADED; START needs it. A load cut short
# (a host that dies mid-transfer) therefore leaves it clear, whatever it wrote.
MODEL_REGIONS = (Region.WEIGHTS, Region.BIASES)


IDENTIFY_REGS = (Regs.ID, Regs.CONFIG_HASH, Regs.GEOMETRY)
STATUS_REGS = (Regs.STATUS, Regs.PC, Regs.INDEX, Regs.UPDATES, Regs.CYCLES, Regs.CYCLES_FROZEN,
               Regs.CYCLES_CACHED, Regs.CYCLES_INFER)
# STATUS answers STATUS_REGS, then STARTS: the STARTs the link has served since reset
# (mod 2**32), which tells a host whose START response was lost whether it took effect
STATUS_WORDS = len(STATUS_REGS) + 1


@dataclasses.dataclass(frozen=True)
class Window:
    """The offsets of one region that a WRITE or READ may reach: those below ``limit``
    (``region_words << chunk_bits``) whose chunk (the low ``chunk_bits``) is below
    ``chunks``; ``writable``: WRITE may reach them."""
    limit: int
    chunk_bits: int
    chunks: int
    writable: bool

    @property
    def gapped(self):
        """Some chunk numbers name no chunk (chunks is not a power of two): a range
        then has to stay inside one word."""
        return self.chunks < 1 << self.chunk_bits


@functools.lru_cache(maxsize=8)
def windows(cfg):
    """{Region: Window} for configuration ``cfg``. REGS is read only here (START and
    ABORT write CONTROL); RESULTS and LOGITS are read only; region numbers 10..15 have
    no window."""
    out = {}
    for region in Region:
        cb = chunk_bits(region, cfg)
        limit = region_words(region, cfg) << cb
        assert 0 < limit <= 1 << OFFSET_BITS, (region, limit)
        out[region] = Window(limit, cb, -(-word_bits(region, cfg) // 32),
                             region in WRITABLE and region is not Region.REGS)
    return out


def address_ok(address, count, write, cfg):
    """Whether a WRITE (``write``) or READ of ``count`` (>= 1) words from port address
    ``address`` (bits 31..28 ignored) stays inside one region's window."""
    address &= (1 << PORT_ADDR_BITS) - 1
    try:
        w = windows(cfg)[Region(address >> OFFSET_BITS)]
    except ValueError:
        return False
    first = address & ((1 << OFFSET_BITS) - 1)
    last = first + count - 1
    if (write and not w.writable) or last >= w.limit:
        return False
    # in a gapped region, a range crossing into the next word passes the gap
    return not w.gapped or (first >> w.chunk_bits == last >> w.chunk_bits
                            and last & ((1 << w.chunk_bits) - 1) < w.chunks)
