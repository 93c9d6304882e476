"""The sequencer's instruction set and the registers its programs load.

This module is the one definition of the encoding: the sequencer (`gateware.sequencer`),
the instruction-level golden model (`sim.machine`), the assembler (`firmware.asm`) and
the compiler (`firmware.compiler`) all read it. docs/isa.md is its prose twin.

An instruction is one 32-bit word: ``op`` in bits 31..27, its argument in bits 26..0
laid out as ``ARGS[op]`` (unused argument bits must be zero). Wide run-time settings (a
layer's conv descriptor, the LoRA engine's setup, the cache's setup, the gather table,
the learning rate, the LFSR seed) are not immediates: they sit in the program memory as
data words, little end first, and ``LAYER`` / ``LOAD`` copy them into the unit's
register.
"""

from amaranth import signed, unsigned
from amaranth.lib import data, enum
from amaranth.utils import bits_for

from .layers import ADDR_BITS, ConvDescriptor

__all__ = ["Opcode", "Phase", "Cond", "Reg", "Error", "Instruction", "ARGS", "IsaError",
           "WORD_BITS", "OP_BITS", "ARG_BITS", "encode", "decode",
           "adapter_setup_layout", "lora_setup_layout", "cache_layer_layout",
           "cache_setup_layout", "gather_layout", "lr_layout", "register_layout",
           "layout_words", "pack", "unpack", "H_SHIFT_BITS", "FSHIFT_BITS", "EXP_BITS",
           "LFSR_BITS", "COUNT_BITS", "LOOP_DEPTH", "CONV_WORDS"]

WORD_BITS = 32
OP_BITS = 5
ARG_BITS = WORD_BITS - OP_BITS
COUNT_BITS = 16                 # loop counts, sample indices and program addresses
LOOP_DEPTH = 4                  # nested LOOPs

# Shift of h_l, s_x[l] + F_w - F_h: any value in [-32, 31] is computed exactly.
H_SHIFT_BITS = 6
# f_d - F_n, the gradient's shift into the update: -1 .. 2 (A_l) and 8 (B_l) for the
# shipped models; any value in [-32, 31] is computed exactly.
FSHIFT_BITS = 6
# Learning-rate exponent: lr = mant * 2^-exp (check_limits keeps exp in [11, 29]).
EXP_BITS = 7
LFSR_BITS = 32


class IsaError(ValueError):
    """A word that is not an instruction, or an argument that does not fit."""


class Opcode(enum.Enum, shape=OP_BITS):
    HALT = 0        # stop; the device reports done
    SYNC = 1        # wait until every unit is idle
    PHASE = 2       # SYNC, then count cycles in phase ``phase``
    LOAD = 3        # register ``reg`` <- program words [addr, addr + layout_words)
    LOOP = 4        # repeat the instructions up to the matching ENDLOOP ``count`` times
    ENDLOOP = 5
    SETIDX = 6      # sample index <- ``index``
    INCIDX = 7      # sample index += 1
    MOVE = 8        # sample ``index`` (``stride`` bytes apart) -> layer 0's input
    LAYER = 9       # conv descriptor <- program words at ``addr``; start the layer
    GATHER = 10     # adapter inputs and base logits -> LoRA engine and/or cache fill
    LOOKUP = 11     # cache lookup of the sample index; a hit streams it to the LoRA engine
    BRANCH = 12     # pc <- ``target`` if ``cond`` holds
    UPDATE = 13     # the batch is complete: update every adapter weight
    CLEAR = 14      # SYNC, then clear what the mask names


class Phase(enum.Enum, shape=2):
    NONE = 0
    FROZEN = 1      # epochs that run the frozen network (the cache-fill epoch; every epoch without cache)
    CACHED = 2      # epochs served from the activation cache
    INFER = 3


class Cond(enum.Enum, shape=2):
    ALWAYS = 0
    HIT = 1         # the last LOOKUP hit
    MISS = 2        # the last LOOKUP missed


class Reg(enum.Enum, shape=4):
    ADAPTER = 0     # lora_setup_layout: the LoRA engine
    CACHE = 1       # cache_setup_layout: the activation cache and the gather's 4-bit format
    GATHER = 2      # gather_layout: where the adapter inputs sit in the activation buffer
    LR = 3          # lr_layout: learning rate mant * 2^-exp
    SEED = 4        # the update unit's LFSR seed (CLEAR seed loads it)


class Error(enum.Enum, shape=8):
    """Why a program stopped with an error (the device's status register)."""
    NONE = 0
    OPCODE = 1      # an undefined opcode, register or condition
    PC = 2          # the program counter (or a LOAD/LAYER data word) left the program memory
    LOOP = 3        # LOOP with count 0, loops nested too deep, ENDLOOP without LOOP
    INDEX = 4       # a sample index beyond the sample or label memory
    CACHE = 5       # the cache rejected a fill packet (misframed)


_EMPTY = data.StructLayout({})

ARGS = {
    Opcode.HALT: _EMPTY,
    Opcode.SYNC: _EMPTY,
    Opcode.PHASE: data.StructLayout({"phase": Phase}),
    Opcode.LOAD: data.StructLayout({"addr": unsigned(COUNT_BITS), "reg": Reg}),
    Opcode.LOOP: data.StructLayout({"count": unsigned(COUNT_BITS)}),
    Opcode.ENDLOOP: _EMPTY,
    Opcode.SETIDX: data.StructLayout({"index": unsigned(COUNT_BITS)}),
    Opcode.INCIDX: _EMPTY,
    Opcode.MOVE: data.StructLayout({"stride": unsigned(COUNT_BITS)}),
    Opcode.LAYER: data.StructLayout({"addr": unsigned(COUNT_BITS)}),
    Opcode.GATHER: data.StructLayout({"lora": unsigned(1), "fill": unsigned(1)}),
    Opcode.LOOKUP: _EMPTY,
    Opcode.BRANCH: data.StructLayout({"target": unsigned(COUNT_BITS), "cond": Cond}),
    Opcode.UPDATE: _EMPTY,
    Opcode.CLEAR: data.StructLayout({"grads": unsigned(1), "moments": unsigned(1),
                                     "seed": unsigned(1), "cache": unsigned(1),
                                     "counters": unsigned(1)}),
}

Instruction = data.StructLayout({
    "arg": data.UnionLayout({op.name.lower(): layout for op, layout in ARGS.items()
                             if layout.size} | {"bits": unsigned(ARG_BITS)}),
    "op": Opcode,
})
assert Instruction.size == WORD_BITS
assert all(layout.size <= ARG_BITS for layout in ARGS.values())


def _fields(layout):
    return {name: field.shape for name, field in layout}


def encode(op, **fields):
    """The word of instruction ``op`` (an `Opcode` or its name) with argument ``fields``
    (ints, or enum members / names for enum fields). Raises IsaError on a missing,
    unknown or out-of-range field."""
    if isinstance(op, str):
        try:
            op = Opcode[op.upper()]
        except KeyError:
            raise IsaError(f"unknown instruction {op!r}") from None
    layout = ARGS[op]
    shapes = _fields(layout)
    extra = set(fields) - set(shapes)
    if extra:
        raise IsaError(f"{op.name} has no field {sorted(extra)[0]!r}")
    arg = 0
    for name, field in layout:
        if name not in fields:
            raise IsaError(f"{op.name} needs {name}")
        value = fields[name]
        shape = field.shape
        if isinstance(shape, type) and issubclass(shape, enum.Enum):
            if isinstance(value, str):
                try:
                    value = shape[value.upper()]
                except KeyError:
                    raise IsaError(f"{op.name}: {name} {value!r} is not one of "
                                   f"{', '.join(m.name.lower() for m in shape)}") from None
            try:
                value = shape(value).value
            except ValueError:
                raise IsaError(f"{op.name}: {name} {value!r} is not one of "
                               f"{', '.join(m.name.lower() for m in shape)}") from None
            width = shape.as_shape().width
        else:
            width = shape.width
        value = int(value)
        if not 0 <= value < (1 << width):
            raise IsaError(f"{op.name}: {name} {value} does not fit in {width} bits")
        arg |= value << field.offset
    return (op.value << ARG_BITS) | arg


def decode(word):
    """(Opcode, {field: int}) of an instruction word. Raises IsaError for a word that is
    not an instruction: an undefined opcode or enum value, or non-zero unused bits."""
    word = int(word)
    if not 0 <= word < (1 << WORD_BITS):
        raise IsaError(f"{word:#x} is not a 32-bit word")
    try:
        op = Opcode(word >> ARG_BITS)
    except ValueError:
        raise IsaError(f"undefined opcode {word >> ARG_BITS} in {word:#010x}") from None
    arg = word & ((1 << ARG_BITS) - 1)
    fields, used = {}, 0
    for name, field in ARGS[op]:
        shape = field.shape
        is_enum = isinstance(shape, type) and issubclass(shape, enum.Enum)
        width = shape.as_shape().width if is_enum else shape.width
        value = (arg >> field.offset) & ((1 << width) - 1)
        used |= ((1 << width) - 1) << field.offset
        if is_enum:
            try:
                value = shape(value)
            except ValueError:
                raise IsaError(f"{op.name}: {name} {value} is undefined in {word:#010x}") from None
        fields[name] = value
    if arg & ~used:
        raise IsaError(f"{op.name}: unused bits set in {word:#010x}")
    return op, fields


# ---------------------------------------------------------------- registers ----------


def adapter_setup_layout(cfg):
    """The adapter datapath's setup: ``n_layers`` (0..max_layers), ``rank`` r
    (1..max_rank), ``classes`` C (1..max_classes) and per layer ``layers[l].size`` (``d_l``,
    1..max_adapter_in) and ``layers[l].h_shift`` (``s_x[l] + F_w - F_h``, signed)."""
    return data.StructLayout({
        "n_layers": unsigned(bits_for(cfg.max_layers)),
        "rank": unsigned(bits_for(cfg.max_rank)),
        "classes": unsigned(bits_for(cfg.max_classes)),
        "layers": data.ArrayLayout(data.StructLayout({
            "size": unsigned(bits_for(cfg.max_adapter_in)),
            "h_shift": signed(H_SHIFT_BITS),
        }), cfg.max_layers),
    })


def lora_setup_layout(cfg):
    """The LoRA engine's setup (register ADAPTER): ``adapter`` (`adapter_setup_layout`) and
    per layer ``fshift[l].a`` and ``fshift[l].b``, the shift ``f_d - F_n`` of the
    batch-summed gradient into the update (``f_d = s_x[l] + F_e`` for ``dA_l``, ``F_h +
    F_g`` for ``dB_l``)."""
    return data.StructLayout({
        "adapter": adapter_setup_layout(cfg),
        "fshift": data.ArrayLayout(data.StructLayout({
            "a": signed(FSHIFT_BITS),
            "b": signed(FSHIFT_BITS),
        }), cfg.max_layers),
    })


def cache_layer_layout(cfg):
    return data.StructLayout({
        "size":   unsigned(bits_for(cfg.cache_act_words)),
        "shift":  unsigned(3),
        "signed": unsigned(1),
    })


def cache_setup_layout(cfg):
    """The activation cache's setup (register CACHE): ``bits4`` (0: 8-bit lines, 1: 4-bit
    codes), ``classes``, ``n_layers`` and per layer ``size`` (d_l), ``shift`` (the 4-bit
    cache shift) and ``signed``. The gather unit formats what it sends to the LoRA engine
    with the same fields, so a sample reaches the adapters in the cache's format whether
    it came from the cache or not."""
    return data.StructLayout({
        "bits4":    unsigned(1),
        "classes":  unsigned(bits_for(cfg.max_classes)),
        "n_layers": unsigned(bits_for(cfg.max_layers)),
        "layers":   data.ArrayLayout(cache_layer_layout(cfg), cfg.max_layers),
    })


def gather_layout(cfg):
    """Where the adapter inputs sit in the activation buffer (register GATHER): ``n_layers``,
    ``classes`` (base logits, read from the logit memory at word 0) and per layer
    ``base`` (first word of x_l), ``pixels`` (H * W), ``groups`` (words per pixel,
    ceil(channels / C)) and ``tail`` (valid lanes of a pixel's last word, 1..C). x_l is
    read pixel by pixel, each pixel's words in order, the valid lanes of each word in
    order: the (i, j, c) flattening of the golden model. Entry 0 is also where ``MOVE``
    writes a sample."""
    cols = cfg.array_cols
    return data.StructLayout({
        "n_layers": unsigned(bits_for(cfg.max_layers)),
        "classes": unsigned(bits_for(cfg.max_classes)),
        "layers": data.ArrayLayout(data.StructLayout({
            "base": unsigned(ADDR_BITS),
            "pixels": unsigned(bits_for(cfg.max_adapter_in)),
            "groups": unsigned(bits_for(-(-cfg.max_adapter_in // cols))),
            "tail": unsigned(bits_for(cols)),
        }), cfg.max_layers),
    })


def lr_layout(cfg):
    """Learning rate ``mant * 2**-exp`` (`sim.fixed_model.lr_mantissa`)."""
    return data.StructLayout({"mant": unsigned(cfg.lr_mant_bits), "exp": signed(EXP_BITS)})


def register_layout(reg, cfg):
    """The layout of LOAD register ``reg``."""
    return {
        Reg.ADAPTER: lora_setup_layout,
        Reg.CACHE: cache_setup_layout,
        Reg.GATHER: gather_layout,
        Reg.LR: lr_layout,
        Reg.SEED: lambda cfg: data.StructLayout({"seed": unsigned(LFSR_BITS)}),
    }[Reg(reg)](cfg)


def layout_words(layout):
    """Program words a value of ``layout`` takes (``LOAD``, ``LAYER``)."""
    return -(-layout.size // WORD_BITS)


def pack(layout, value):
    """The program words of ``value`` (a dict of plain values, nested like the layout;
    missing fields are zero), little end first."""
    bits = layout.const(value).as_value().value
    return [(bits >> (WORD_BITS * i)) & ((1 << WORD_BITS) - 1) for i in range(layout_words(layout))]


def unpack(layout, words):
    """A `data.Const` view of ``layout`` from its program words (field access gives ints
    and nested views)."""
    bits = 0
    for i, w in enumerate(words):
        bits |= (int(w) & ((1 << WORD_BITS) - 1)) << (WORD_BITS * i)
    return data.Const(layout, bits & ((1 << layout.size) - 1))


CONV_WORDS = layout_words(ConvDescriptor)
