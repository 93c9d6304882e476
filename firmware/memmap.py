"""The accelerator's host port: its address map, registers and word formats.

The top level (`gateware.top.Accelerator`) exposes one internal port of 32-bit words; the
host link drives it, the instruction-level model (`sim.machine`) serves the same map.

An address is ``region << OFFSET_BITS | offset``. Regions whose memory words are wider
than 32 bits (weights, biases, activations, logits) are reached in 32-bit chunks: chunk
``k`` of word ``w`` is offset ``w << chunk_bits(region) | k``, chunk 0 holding the
lowest lanes. A write of a chunk other than the last only stages it; writing the last
chunk commits the whole word, so a word is always written chunk 0 first and last chunk
last. While a program runs, only the REGS region is served: other reads return 0, other
writes are dropped, and both set the status bit ``refused``.
"""

import numpy as np
from amaranth.lib import enum
from amaranth.utils import ceil_log2

__all__ = ["Region", "Regs", "Status", "Control", "ID_MAGIC", "OFFSET_BITS", "PORT_ADDR_BITS",
           "word_bits", "chunk_bits", "region_words", "address", "WRITABLE", "adapter_bases",
           "adapter_span", "adapter_addresses", "read_adapters", "write_adapters"]

OFFSET_BITS = 24
PORT_ADDR_BITS = 28
ID_MAGIC = 0x534B5431           # "SKT1"


class Region(enum.Enum, shape=4):
    REGS = 0        # the registers below
    PROGRAM = 1     # program_words x 32 bits: instructions and their data words
    SAMPLES = 2     # sample_words bytes, four per word, little end first
    LABELS = 3      # max_samples labels, one per word
    WEIGHTS = 4     # write only: weight_words / C words of C int8 lanes (reads give 0)
    BIASES = 5      # write only: bias_words / C words of C int32 lanes (reads give 0)
    ADAPTERS = 6    # adapter_words int32 master weights, laid out by `adapter_bases`
    RESULTS = 7     # read only: per inferred sample, prediction | correct << 8
    ACT = 8         # activation buffer, act_words words of C int8 lanes
    LOGITS = 9      # read only: the last layer's int16 logits, C lanes per word


WRITABLE = {Region.REGS, Region.PROGRAM, Region.SAMPLES, Region.LABELS, Region.WEIGHTS,
            Region.BIASES, Region.ADAPTERS, Region.ACT}


class Regs(enum.IntEnum):
    """Word offsets in the REGS region (all read only except CONTROL)."""
    ID = 0              # ID_MAGIC
    CONFIG_HASH = 1     # AccelConfig.hash
    GEOMETRY = 2        # array_rows | array_cols << 8 | max_classes << 16 | max_layers << 24
    STATUS = 3          # `Status` bits
    PC = 4
    CONTROL = 5         # write: `Control` bits, entry pc in bits 31..16; reads 0
    INDEX = 6           # the sample index register
    UPDATES = 7         # UPDATE instructions executed
    CYCLES = 8          # cycles with a program running
    CYCLES_FROZEN = 9   # ... in each phase
    CYCLES_CACHED = 10
    CYCLES_INFER = 11
    LAYER_CYCLES = 12   # cycles the layer engine was busy
    LORA_FWD = 13       # LoRA engine: cycles with a sample in the adapter
    LORA_UPD = 14       # LoRA engine: cycles of weight updates
    SAMPLES = 15        # samples through the loss unit
    CORRECT = 16        # ... predicted correctly
    CACHE_HITS = 17
    CACHE_MISSES = 18
    LFSR = 19           # the update unit's LFSR state


class Status(enum.IntFlag):
    RUNNING = 1 << 0
    DONE = 1 << 1       # the last program reached HALT
    ERROR = 1 << 2      # the last program stopped with an error; code in bits 15..8
    REFUSED = 1 << 3    # a memory access while running was refused (cleared by start)
    # bits 15..8: `firmware.isa.Error` code; bits 17..16: the current `firmware.isa.Phase`


class Control(enum.IntFlag):
    START = 1 << 0      # run from the entry pc (ignored while running)
    ABORT = 1 << 1      # stop a running program (status: neither done nor error)


def word_bits(region, cfg):
    """Width of one memory word of ``region``."""
    C = cfg.array_cols
    return {Region.WEIGHTS: 8 * C, Region.BIASES: 32 * C, Region.ACT: 8 * C,
            Region.LOGITS: 16 * C}.get(Region(region), 32)


def chunk_bits(region, cfg):
    """Offset bits that select the 32-bit chunk of a word."""
    return ceil_log2(-(-word_bits(region, cfg) // 32))


def region_words(region, cfg):
    """Memory words in ``region``."""
    C = cfg.array_cols
    return {
        Region.REGS: len(Regs),
        Region.PROGRAM: cfg.program_words,
        Region.SAMPLES: cfg.sample_words // 4,
        Region.LABELS: cfg.max_samples,
        Region.WEIGHTS: cfg.weight_words // C,
        Region.BIASES: cfg.bias_words // C,
        Region.ADAPTERS: cfg.adapter_words,
        Region.RESULTS: cfg.max_samples,
        Region.ACT: cfg.act_words,
        Region.LOGITS: -(-cfg.max_classes // C),
    }[Region(region)]


def address(region, word, cfg, chunk=0):
    """The port address of chunk ``chunk`` of ``word`` in ``region``."""
    region = Region(region)
    return (region.value << OFFSET_BITS) | (word << chunk_bits(region, cfg)) | chunk


# The ADAPTERS region. The LoRA engine keeps word ``a`` in bank ``a mod P`` (P =
# ``cfg.adapter_lanes``) and reads one row of an A_l or B_l per cycle, lane j from bank j.
# So that no row needs rotating onto the lanes, none may cross a multiple of P: every
# tensor starts at a multiple of P, a row of A_l takes R words (R = the rank rounded up to
# a power of two, which divides P) and a row of B_l takes P words. The words between are
# padding: the engine never reads them into a sum and never writes them.


def _row_stride(rank):
    return 1 << (rank - 1).bit_length()


def adapter_bases(sizes, rank, cfg):
    """``([(a_l, b_l)], end)``: where ``A_l`` and ``B_l`` start for adapters of inputs
    ``sizes`` (the d_l) at rank ``rank``, and the word after the last. ``A_l[i, k]`` is at
    ``a_l + i R + k`` and ``B_l[k, c]`` at ``b_l + k P + c``; ``a_0 = 0``,
    ``b_l = a_l + d_l R`` rounded up to a multiple of P, ``a_{l+1} = b_l + r P``."""
    P, R = cfg.adapter_lanes, _row_stride(rank)
    if rank < 1 or R > P:
        raise ValueError(f"rank {rank} does not fit {P} adapter lanes")
    bases, a = [], 0
    for d in sizes:
        b = -(-(a + d * R) // P) * P
        bases.append((a, b))
        a = b + rank * P
    return bases, a


def adapter_span(sizes, rank, cfg):
    """ADAPTERS words from offset 0 that adapters of inputs ``sizes`` take, padding
    included: what the host reads back and what must fit ``adapter_words``."""
    return adapter_bases(sizes, rank, cfg)[1]


def adapter_addresses(sizes, rank, classes, cfg):
    """The ADAPTERS offset of every weight in the order ``A_0, B_0, A_1, B_1, ...`` (each
    row-major): ``words[adapter_addresses(...)]`` gathers the weights, and assigning to it
    scatters them."""
    P, R = cfg.adapter_lanes, _row_stride(rank)
    if classes > P:
        raise ValueError(f"{classes} classes do not fit {P} adapter lanes")
    out = []
    for d, (a, b) in zip(sizes, adapter_bases(sizes, rank, cfg)[0]):
        out.append((a + np.arange(d)[:, None] * R + np.arange(rank)).ravel())
        out.append((b + np.arange(rank)[:, None] * P + np.arange(classes)).ravel())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def read_adapters(words, sizes, rank, classes, cfg):
    """[(A_l, B_l)] gathered from ``words``, an array of the ADAPTERS region from offset 0
    (copies, not views)."""
    flat = np.asarray(words)[adapter_addresses(sizes, rank, classes, cfg)]
    out, off = [], 0
    for d in sizes:
        a = flat[off:off + d * rank].reshape(d, rank)
        off += d * rank
        out.append((a, flat[off:off + rank * classes].reshape(rank, classes)))
        off += rank * classes
    return out


def write_adapters(words, pairs, cfg, add=False):
    """Scatter [(A_l, B_l)] into ``words``, an array of the ADAPTERS region from offset 0,
    at their addresses (added to what is there with ``add``)."""
    if not pairs:
        return
    sizes, rank, classes = [a.shape[0] for a, _ in pairs], pairs[0][0].shape[1], pairs[0][1].shape[1]
    where = adapter_addresses(sizes, rank, classes, cfg)
    values = np.concatenate([np.ravel(m) for pair in pairs for m in pair])
    if add:
        words[where] += values
    else:
        words[where] = values
