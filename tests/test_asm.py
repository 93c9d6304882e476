"""The assembler and disassembler (firmware.asm) against the encoding (firmware.isa):
every field of every opcode through encode/decode, the text syntax and the builder; any
word list through disassemble/assemble; the compiled programs; the error messages."""

import itertools
import random

import pytest
from amaranth.lib import enum
from hypothesis import given, settings, strategies as st

from firmware.asm import Assembler, AsmError, assemble, disassemble, parse, OPERANDS
from firmware.isa import ARGS, Cond, IsaError, Opcode, Phase, Reg, decode, encode
from gateware.config import DEFAULT as CFG
from host.models import load_base_model
from sim.finetune import Schedule

RNG = random.Random(1234)


def _choices(shape):
    """Min, max and random values of a field (every member of an enum)."""
    if isinstance(shape, type) and issubclass(shape, enum.Enum):
        return list(shape)
    top = (1 << shape.width) - 1
    return [0, top] + [RNG.randint(0, top) for _ in range(3)]


def _cases():
    for op, layout in ARGS.items():
        names = [name for name, _ in layout]
        values = [_choices(field.shape) for _, field in layout]
        combos = list(itertools.product(*values))
        RNG.shuffle(combos)
        for combo in combos[:40] or [()]:
            yield op, dict(zip(names, combo))


CASES = list(_cases())


def _plain(fields):
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in fields.items()}


@pytest.mark.parametrize("op", list(Opcode))
def test_every_field_round_trips(op):
    for case_op, fields in CASES:
        if case_op is not op:
            continue
        word = encode(op, **fields)
        assert 0 <= word < 1 << 32 and word >> 27 == op.value
        got_op, got = decode(word)
        assert got_op is op and _plain(got) == _plain(fields)
        # through the text: positional (the disassembly) and field=value
        text = disassemble([word])
        assert assemble(text) == [word], text
        keywords = " ".join(f"{k}={v.name.lower() if isinstance(v, enum.Enum) else hex(v)}"
                            for k, v in fields.items())
        assert assemble(f"{op.name.lower()} {keywords}") == [word]
        # through the builder, enum fields by member, by name and by value
        asm = Assembler()
        asm.emit(op, **fields)
        asm.emit(op.name, **{k: v.name if isinstance(v, enum.Enum) else v for k, v in fields.items()})
        asm.emit(op, **_plain(fields))
        assert asm.assemble() == [word] * 3


def test_cases_cover_every_field_at_its_limits():
    seen = {(op, name, _plain({name: v})[name]) for op, f in CASES for name, v in f.items()}
    for op, layout in ARGS.items():
        for name, field in layout:
            for v in _choices(field.shape)[:2]:
                assert (op, name, _plain({name: v})[name]) in seen


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, (1 << 32) - 1))
def test_any_word_decodes_exactly_or_is_refused(word):
    try:
        op, fields = decode(word)
    except IsaError:
        assert disassemble([word]).split()[0] == ".word"
    else:
        assert encode(op, **fields) == word
    assert assemble(disassemble([word])) == [word]


def _program(rng, n):
    """Random words, most of them instructions whose addresses point into the list."""
    words = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            op = rng.choice([Opcode.BRANCH, Opcode.LOAD, Opcode.LAYER])
            fields = {"addr": rng.randrange(n + 1)} if op is not Opcode.BRANCH else \
                {"target": rng.randrange(n + 1), "cond": rng.choice(list(Cond))}
            if op is Opcode.LOAD:
                fields["reg"] = rng.choice(list(Reg))
            words.append(encode(op, **fields))
        elif kind < 0.8:
            op, fields = rng.choice(CASES)
            words.append(encode(op, **fields))
        else:
            words.append(rng.getrandbits(32))
    return words


@pytest.mark.parametrize("seed", range(30))
def test_any_word_list_round_trips_through_text(seed):
    rng = random.Random(seed)
    words = _program(rng, rng.randrange(0, 60))
    for code_words in (None, rng.randrange(len(words) + 1), len(words)):
        text = disassemble(words, code_words, addresses=bool(seed % 2))
        assert assemble(text) == words, text
        # and text -> words -> text -> words
        assert assemble(disassemble(assemble(text))) == words


@pytest.fixture(scope="module")
def digits():
    return load_base_model("digits")


@pytest.mark.parametrize("cache", [True, False])
def test_compiled_programs_round_trip(digits, cache):
    from firmware.compiler import compile_finetune, compile_infer
    for prog in (compile_finetune(digits, Schedule(epochs=3, cache=cache), CFG, 359),
                 compile_infer(digits, CFG, 200)):
        assert assemble(prog.listing, CFG) == prog.words
        plain = disassemble(prog.words)
        assert assemble(plain) == prog.words
        # the inferred code length is the compiler's: every data word follows a LOAD/LAYER
        assert ".word" not in plain and plain.count(".data") >= 1
        assert len([l for l in plain.splitlines() if l.startswith("    ") and ".data" not in l]) \
            == prog.code_words
        assert assemble(disassemble(prog.words, prog.code_words, addresses=True)) == prog.words


def test_text_syntax():
    text = """
    ; the shapes the compiled programs use
            LOAD ADAPTER, regs          ; comment
            load reg=cache addr=regs+8
            CLEAR grads seed counters
    top:    LOOKUP
            BRANCH hit, next
            GATHER fill
    next:   INCIDX
            BRANCH top
    a: b:   BRANCH MISS a
            BRANCH cond=2 target=0x3
            LOOP count=0b11
            .word 0xdeadbeef, 7
            .data regs 1 2 -1
            .data more 0xffffffff
            .data end
    """
    asm = parse(text, CFG)
    words = asm.assemble()
    assert asm.symbols == {"top": 3, "next": 6, "a": 8, "b": 8, "regs": 13, "more": 16, "end": 17}
    assert asm.code_words == 13
    assert words[0] == encode(Opcode.LOAD, reg=Reg.ADAPTER, addr=13)
    assert words[1] == encode(Opcode.LOAD, reg=Reg.CACHE, addr=21)
    assert words[2] == encode(Opcode.CLEAR, grads=1, moments=0, seed=1, cache=0, counters=1)
    assert words[4] == encode(Opcode.BRANCH, target=6, cond=Cond.HIT)
    assert words[5] == encode(Opcode.GATHER, lora=0, fill=1)
    assert words[7] == encode(Opcode.BRANCH, target=3, cond=Cond.ALWAYS)
    assert words[8] == encode(Opcode.BRANCH, target=8, cond=Cond.MISS)
    assert words[9] == encode(Opcode.BRANCH, target=3, cond=Cond.MISS)
    assert words[10] == encode(Opcode.LOOP, count=3)
    assert words[11:] == [0xDEADBEEF, 7, 1, 2, 0xFFFFFFFF, 0xFFFFFFFF]
    listing = asm.listing()
    assert "BRANCH HIT, next" in listing and "CLEAR grads seed counters" in listing
    assert assemble(listing) == words


def test_builder():
    asm = Assembler(CFG)
    asm.emit(Opcode.LOAD, reg=Reg.SEED, addr="seed")
    asm.label("loop")
    asm.emit("phase", phase=Phase.CACHED)
    asm.emit(Opcode.BRANCH, target="loop")                   # cond defaults to ALWAYS
    asm.emit(Opcode.CLEAR, moments=1)                        # flags default to 0
    asm.emit(Opcode.LAYER, addr="desc+1")
    asm.data("seed", [0x2545F491])
    asm.data("desc", range(12))
    words = asm.assemble()
    assert asm.here == asm.code_words == 5 and len(words) == 18
    assert asm.symbols["seed"] == 5 and asm.symbols["desc"] == 6
    assert decode(words[0]) == (Opcode.LOAD, {"addr": 5, "reg": Reg.SEED})
    assert decode(words[2]) == (Opcode.BRANCH, {"target": 1, "cond": Cond.ALWAYS})
    assert decode(words[4]) == (Opcode.LAYER, {"addr": 7})
    assert words[5:] == [0x2545F491] + list(range(12))


@pytest.mark.parametrize("text, message", [
    ("FROB 3", "line 1: unknown instruction 'FROB'"),
    ("HALT\nLOOP 65536", "line 2: LOOP count: 65536 does not fit in 16 bits"),
    ("SETIDX -1", "SETIDX index: -1 does not fit in 16 bits"),
    ("LOOP", "LOOP needs count"),
    ("LOOP cnt=3", "LOOP has no field 'cnt'"),
    ("MOVE 1, 2", "MOVE takes 1 operand(s) (stride), got 2"),
    ("HALT 0", "HALT takes 0 operand(s)"),
    ("LOAD FOO, 0", "LOAD reg: 'FOO' is not one of ADAPTER, CACHE, GATHER, LR, SEED"),
    ("LOAD reg=9 addr=0", "LOAD reg: 9 is not one of"),
    ("PHASE 4", "PHASE phase: 4 is not one of NONE=0, FROZEN=1, CACHED=2, INFER=3"),
    ("BRANCH SOMETIMES, 0", "BRANCH cond: 'SOMETIMES' is not one of ALWAYS, HIT, MISS"),
    ("BRANCH nowhere", "BRANCH: undefined label 'nowhere'"),
    ("LAYER x+99999\nx:", "LAYER addr: 100000 does not fit in 16 bits"),
    ("SETIDX top\ntop: HALT", "SETIDX index: 'top' is not a number"),
    ("x: HALT\nx: HALT", "line 2: duplicate label 'x'"),
    ("x: HALT\n.data x 1", "line 2: duplicate label 'x'"),
    ("GATHER lora lora", "GATHER: lora given twice"),
    ("CLEAR grads all", "CLEAR: 'all' is not one of its flags (grads, moments, seed, cache, counters)"),
    ("LOOP count=1 2", "positional operand '2' after field=value"),
    (".byte 1", "unknown directive '.byte'"),
    (".data", ".data needs a name"),
    (".data 3x 1", "'3x' is not a label name"),
    (".word 0x100000000", "data word 4294967296 does not fit in 32 bits"),
    (".word zz", "data word: 'zz' is not a number"),
    ("HALT\n" * 1025, "the program takes 1025 words; the program memory has 1024"),
])
def test_assembler_errors(text, message):
    with pytest.raises(IsaError) as info:
        assemble(text, CFG)
    assert isinstance(info.value, AsmError)
    assert message in str(info.value)


@pytest.mark.parametrize("word, message", [
    (0xF8000000, "undefined opcode 31"),
    (15 << 27, "undefined opcode 15"),
    (encode(Opcode.HALT) | 1, "HALT: unused bits set"),
    (encode(Opcode.GATHER, lora=1, fill=1) | 1 << 2, "GATHER: unused bits set"),
    (encode(Opcode.LOAD, addr=0, reg=0) | 1 << 20, "LOAD: unused bits set"),
    (encode(Opcode.LOAD, addr=0, reg=0) | 9 << 16, "LOAD: reg 9 is undefined"),
    (encode(Opcode.BRANCH, target=0, cond=0) | 3 << 16, "BRANCH: cond 3 is undefined"),
    (1 << 32, "is not a 32-bit word"),
])
def test_decode_errors(word, message):
    with pytest.raises(IsaError, match=message):
        decode(word)


def test_disassembler_and_builder_errors():
    with pytest.raises(AsmError, match="word 1: 0x100000000 is not a 32-bit word"):
        disassemble([0, 1 << 32])
    with pytest.raises(AsmError, match="word 0: 'x' is not an integer"):
        disassemble(["x"])
    with pytest.raises(AsmError, match="code_words 3 outside 0..2"):
        disassemble([0, 0], code_words=3)
    with pytest.raises(AsmError, match="'a b' is not a label name"):
        disassemble([0], names={0: "a b"})
    asm = Assembler()
    with pytest.raises(AsmError, match="unknown instruction 'jump'"):
        asm.emit("jump")
    with pytest.raises(AsmError, match="unknown instruction 99"):
        asm.emit(99)
    with pytest.raises(AsmError, match="MOVE stride: 'far' is not a number"):
        asm.emit(Opcode.MOVE, stride="far")
    with pytest.raises(AsmError, match="BRANCH target: 65536 does not fit"):
        asm.emit(Opcode.BRANCH, target=65536)
    asm.label("x")
    with pytest.raises(AsmError, match="duplicate label 'x'"):
        asm.data("x", [1])


def test_operand_orders_are_documented():
    """The positional order the module docstring promises."""
    import firmware.asm as mod
    doc = mod.__doc__.replace("[cond,] ", "cond, ")
    for op, order in OPERANDS.items():
        if order and op not in (Opcode.GATHER, Opcode.CLEAR):
            assert f"{op.name} {', '.join(order)}" in doc
