"""The one configuration of a skiptune accelerator.

`AccelConfig` is read by the gateware, the golden model in `sim/`, the compiler in
`firmware/` and the host. It deliberately imports nothing but the standard library, so
that `sim/` can import it without importing any gateware.

Fixed-point formats are given as fractional-bit counts ``F_*``: an integer ``q`` stored
in that format means ``q * 2**-F``. docs/numerics.md is the prose twin of this file.
"""

import dataclasses
import hashlib
import json

__all__ = ["AccelConfig", "DEFAULT", "BOARDS", "board_config", "config_by_hash"]


@dataclasses.dataclass(frozen=True)
class AccelConfig:
    # Systolic array of int8 x int8 -> int32 multiply-accumulates.
    array_rows: int = 8
    array_cols: int = 8

    # Memory depths, in entries of the natural width of each memory.
    weight_words: int = 32768          # int8 frozen weights (fan needs 21k with padding)
    bias_words: int = 512              # int32 frozen biases
    sample_words: int = 131072         # int8 input samples, bytes (fan: 423 x 256 = 108 KB)
    max_samples: int = 1024            # labels memory / per-sample bookkeeping
    adapter_words: int = 4096          # int32 master weights of all adapters
    act_words: int = 512               # activation buffer, words of array_cols int8 lanes
    program_words: int = 1024          # sequencer program: instructions and data words

    # Activation cache: capacity in samples and activations per sample. The width (8
    # bits, or 4 bits packed two per byte) is a mode chosen per run by the schedule.
    cache_samples: int = 512
    cache_act_words: int = 512         # activations stored per sample (all layers)

    # Limits the datapath is sized for (accumulator widths are proven against them).
    max_rank: int = 16
    max_classes: int = 16
    max_layers: int = 8
    max_adapter_in: int = 1024
    max_batch: int = 256

    # Numeric formats (docs/numerics.md).
    act_bits: int = 8                  # frozen activations and weights
    weight_bits: int = 8
    acc_bits: int = 32                 # frozen-network accumulator
    logit_bits: int = 16               # base logits f(x) and adapted logits z
    F_z: int = 8                       # logits
    master_bits: int = 32              # adapter master weights
    F_m: int = 24
    adapter_bits: int = 16             # adapter compute copy of the master weights
    F_w: int = 12
    hidden_bits: int = 16              # h and e below
    F_h: int = 10                      # adapter hidden h = x A (int16)
    F_g: int = 14                      # loss gradient softmax(z) - onehot(y) (int16)
    F_e: int = 12                      # back-projected gradient e = g B^T (int16)
    exp_entries: int = 1024            # exponential table of the loss unit (one DP16KD)
    F_t: int = 6                       # table index step: 2**-F_t in logit units
    F_exp: int = 15                    # table values (uint16, exp(0) = 2**15)
    recip_bits: int = 31               # reciprocal R = floor(2**recip_bits / sum)
    # Update rule "shift-Adam" (docs/numerics.md): moments of the batch-summed gradient.
    F_n: int = 16                      # gradient aligned for the update (int32)
    F_v: int = 24                      # g*g as it enters the second moment
    beta1_shift: int = 3               # beta1 = 1 - 2**-3; M = m * 2**3 kept exactly
    beta2_shift: int = 10              # beta2 = 1 - 2**-10; V = v * 2**10 kept exactly
    m_bits: int = 40                   # M, signed, at F_n + beta1_shift
    v_bits: int = 48                   # V, unsigned, at F_v + beta2_shift
    e_min: int = -12                   # floor of the square-root exponent (Adam's eps)
    lr_mant_bits: int = 16             # learning-rate mantissa (unsigned)
    lfsr_taps: int = 0x80200003        # Galois LFSR, x^32 + x^22 + x^2 + x + 1

    # Clocking and link.
    clock_hz: int = 100_000_000
    baud: int = 3_000_000

    def __post_init__(self):
        if self.F_g > 14:
            raise ValueError("F_g above 14 would not fit softmax(z) - onehot(y) in int16")
        for name in ("array_rows", "array_cols", "cache_samples", "max_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def adapter_lanes(self):
        """Lanes of the LoRA engine's adapter datapath, and banks of its memories:
        ``max(max_rank, max_classes)`` rounded up to a power of two, so that one row of any
        ``A_l`` or ``B_l`` is read in one cycle (the ADAPTERS layout,
        `firmware.memmap.adapter_bases`, is built on it)."""
        need = max(self.max_rank, self.max_classes, 1)
        return 1 << (need - 1).bit_length()

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        return dataclasses.asdict(self)

    @property
    def hash(self):
        """A 32-bit digest that the device reports and the host checks."""
        text = json.dumps(self.as_dict(), sort_keys=True).encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:4], "big")


DEFAULT = AccelConfig()


# One configuration per board, sized to its part's block RAM and multipliers
# (docs/board.md has the measured resources). DEFAULT is the simulation configuration:
# the largest memories, every workload fully cached.
BOARDS = {
    # 156 MULT18X18D, 208 DP16KD: the 8x8 array; digits and fan, digits wholly cached
    # The clocks are what the routed designs meet today (docs/board.md): each is a PLL
    # output from 25 MHz that divides into the link's baud rate exactly.
    "ulx3s-85f": DEFAULT.replace(cache_samples=384, cache_act_words=384, sample_words=110592,
                                 weight_words=24576, adapter_words=2048,
                                 clock_hz=60_000_000),
    # 72 MULT18X18D, 108 DP16KD, 44k LUT4: 16 adapter lanes (digits' 10 classes) do not fit
    # its LUTs, so 4 lanes (at most 4 classes: fan), an 8x4 array, all of fan's samples
    # and 8 cache lines (its 108 DP16KD are then all but one in use)
    "ulx3s-45f": DEFAULT.replace(array_cols=4, max_rank=4, max_classes=4, cache_samples=8,
                                 cache_act_words=384, sample_words=110592, weight_words=22528,
                                 adapter_words=2048, program_words=512, clock_hz=60_000_000),
    # 28 MULT18X18D, 56 DP16KD, 24k LUT4: a 4x2 array and 4 adapter lanes (so at most 4
    # classes and rank 4), 64 samples of fan's size, 16 cache lines
    "ulx3s-25f": DEFAULT.replace(array_rows=4, array_cols=2, max_rank=4, max_classes=4,
                                 cache_samples=16, cache_act_words=384, sample_words=16384,
                                 max_samples=64, weight_words=22528, bias_words=256,
                                 adapter_words=1024, program_words=512, clock_hz=60_000_000),
}
# the 12F is the 25F's die (nextpnr places it as one): the same configuration
BOARDS["ulx3s-12f"] = BOARDS["ulx3s-25f"]


def board_config(name):
    """The configuration of board ``name`` (a key of `BOARDS`); None gives DEFAULT."""
    if name is None:
        return DEFAULT
    try:
        return BOARDS[name]
    except KeyError:
        raise ValueError(f"unknown board {name!r}: choose one of {', '.join(BOARDS)}") from None


def config_by_hash(value):
    """The known configuration (DEFAULT or a board's) whose `hash` is ``value``, or None."""
    for cfg in (DEFAULT, *BOARDS.values()):
        if cfg.hash == value:
            return cfg
    return None

