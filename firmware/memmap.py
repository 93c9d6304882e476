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

from amaranth.lib import enum
from amaranth.utils import ceil_log2

__all__ = ["Region", "Regs", "Status", "Control", "ID_MAGIC", "OFFSET_BITS", "PORT_ADDR_BITS",
           "word_bits", "chunk_bits", "region_words", "address", "WRITABLE"]

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
    ADAPTERS = 6    # adapter_words int32 master weights: A_0, B_0, A_1, ... row-major
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
