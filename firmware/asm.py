"""Assembler and disassembler of the sequencer's instruction set (`firmware.isa`).

Two ways in, one program out (a list of 32-bit words: the code, then its data words):

- `Assembler`, the builder the compiler uses: ``emit(op, **fields)``, ``label(name)``,
  ``word(*words)`` (raw words inline in the code), ``data(name, words)`` (a block placed
  after the code, its first word named ``name``) and ``assemble()``. An address field
  (``LOAD``/``LAYER`` ``addr``, ``BRANCH`` ``target``) may name a label, forward or
  backward, as ``"name"``, ``"name+N"`` or ``"name-N"``; labels resolve in `assemble`.
- text, through `assemble` / `parse`, and back through `disassemble`.

Text syntax (case-insensitive but for label names)::

    ; a comment runs from ';' to the end of the line
            LOAD ADAPTER, adapter       ; positional operands, commas optional
            CLEAR grads moments seed    ; 1-bit flags by name: the ones named are set
    top:    LOOKUP                      ; 'name:' labels the next word (alone or before one)
            BRANCH HIT, next            ; BRANCH cond, target  (cond omitted: ALWAYS)
            LAYER addr=conv0            ; or field=value, in any order
            GATHER lora fill
    next:   INCIDX
            HALT
            .word 0x12345678            ; raw words, inline in the code
            .data adapter 0x10 0x0 7    ; a data block after the code, labelled 'adapter'

Positional operand order: ``PHASE phase``, ``LOAD reg, addr``, ``LOOP count``,
``SETIDX index``, ``MOVE stride``, ``LAYER addr``, ``BRANCH [cond,] target``,
``GATHER [lora] [fill]``, ``CLEAR [grads] [moments] [seed] [cache] [counters]``. Numbers are Python
integer literals (``12``, ``0x1f``, ``0b101``); enum fields take their names (``FROZEN``,
``SEED``, ``MISS``) or numbers; flags may also be given as ``fill=1``. Omitted flags are
0 and an omitted ``BRANCH`` condition is ALWAYS (in the builder too). ``.data`` blocks go
after every instruction and ``.word``, in the order written; an empty ``.data name``
names the address just past the previous block.

`disassemble` prints that syntax back, so that ``assemble(disassemble(words)) == words``
for every list of 32-bit words. Which words are code: the first ``code_words`` if given;
otherwise the words before the lowest address above them that a LOAD or LAYER reads
(data follows the code). A code word that does not decode is printed as ``.word``.
Every address that a BRANCH, LOAD or LAYER names gets a label (``L<addr>`` in the code,
``D<addr>`` in the data, unless ``names`` gives one).
"""

import re

from amaranth.lib import enum

from .isa import ARGS, IsaError, Opcode, Cond, WORD_BITS, encode, decode

__all__ = ["AsmError", "Assembler", "parse", "assemble", "disassemble", "format_instruction",
           "ADDRESS_FIELDS", "OPERANDS"]

_MASK = (1 << WORD_BITS) - 1
_NAME = re.compile(r"[A-Za-z_][\w.]*\Z")
_LABELS = re.compile(r"\s*([A-Za-z_][\w.]*)\s*:")
_REF = re.compile(r"([A-Za-z_][\w.]*)\s*(?:([+-])\s*(\w+))?\Z")

# Fields that hold a program address and so may name a label.
ADDRESS_FIELDS = {(Opcode.LOAD, "addr"), (Opcode.LAYER, "addr"), (Opcode.BRANCH, "target")}

# Positional operand order of each instruction (the layout order unless given here).
OPERANDS = {op: tuple(name for name, _ in layout) for op, layout in ARGS.items()}
OPERANDS[Opcode.LOAD] = ("reg", "addr")
OPERANDS[Opcode.BRANCH] = ("cond", "target")

_DEFAULTS = {Opcode.BRANCH: {"cond": Cond.ALWAYS}}


class AsmError(IsaError):
    """A program that does not assemble (or a word list that is not one)."""


def _is_enum(shape):
    return isinstance(shape, type) and issubclass(shape, enum.Enum)


def _width(shape):
    return shape.as_shape().width if _is_enum(shape) else shape.width


def _is_flags(op):
    """GATHER and CLEAR: every field a 1-bit flag, named to set it."""
    layout = ARGS[op]
    return bool(layout.size) and all(not _is_enum(f.shape) and f.shape.width == 1 for _, f in layout)


def _opcode(op):
    if isinstance(op, Opcode):
        return op
    try:
        return Opcode[str(op).upper()] if isinstance(op, str) else Opcode(op)
    except (KeyError, ValueError):
        raise AsmError(f"unknown instruction {op!r} (one of "
                       f"{', '.join(o.name for o in Opcode)})") from None


def _int(text, what):
    try:
        return int(text, 0)
    except ValueError:
        raise AsmError(f"{what}: {text!r} is not a number") from None


def _data_word(value):
    value = _int(value, "data word") if isinstance(value, str) else int(value)
    if not -(1 << (WORD_BITS - 1)) <= value <= _MASK:
        raise AsmError(f"data word {value} does not fit in {WORD_BITS} bits")
    return value & _MASK


def _field_value(op, name, value):
    """A field value as an int, or a (label, offset) reference for an address field."""
    shape = dict(ARGS[op])[name].shape
    width = _width(shape)
    what = f"{op.name} {name}"
    if _is_enum(shape):
        if isinstance(value, str):
            try:
                return shape[value.upper()].value
            except KeyError:
                try:
                    value = int(value, 0)
                except ValueError:
                    raise AsmError(f"{what}: {value!r} is not one of "
                                   f"{', '.join(m.name for m in shape)}") from None
        value = value.value if isinstance(value, enum.Enum) else int(value)
        if value not in {m.value for m in shape}:
            raise AsmError(f"{what}: {value} is not one of "
                           f"{', '.join(f'{m.name}={m.value}' for m in shape)}")
        return value
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            match = _REF.match(value.strip())
            if (op, name) not in ADDRESS_FIELDS or not match:
                raise AsmError(f"{what}: {value!r} is not a number") from None
            label, sign, offset = match.groups()
            offset = _int(offset, what) if offset else 0
            return label, -offset if sign == "-" else offset
    value = int(value)
    if not 0 <= value < (1 << width):
        raise AsmError(f"{what}: {value} does not fit in {width} bits (0..{(1 << width) - 1})")
    return value


class Assembler:
    """Builds one program: instructions and raw words (the code), labels, data blocks.

    ``cfg`` (an AccelConfig), when given, bounds the program by ``cfg.program_words``.
    Errors raise `AsmError` (an `IsaError`)."""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self._code = []          # (op, fields, where) or a raw int
        self._data = []          # (name, [words])
        self._labels = {}        # name -> code address
        self.symbols = {}        # name -> address, after assemble()

    @property
    def here(self):
        """The address of the next code word."""
        return len(self._code)

    @property
    def code_words(self):
        return len(self._code)

    def _define(self, name, where=""):
        if not isinstance(name, str) or not _NAME.match(name):
            raise AsmError(f"{where}{name!r} is not a label name (letters, digits, '_', '.')")
        if name in self._labels or any(name == n for n, _ in self._data):
            raise AsmError(f"{where}duplicate label {name!r}")

    def label(self, name, *, where=""):
        """Name the next code word."""
        self._define(name, where)
        self._labels[name] = self.here

    def emit(self, op, *, where="", **fields):
        """Append instruction ``op`` (an Opcode or its name); returns its address. Address
        fields may be label references; everything else is checked now. ``where``
        prefixes error messages (the text's line)."""
        op = _opcode(op)
        layout = dict(ARGS[op])
        unknown = sorted(set(fields) - set(layout))
        if unknown:
            raise AsmError(f"{where}{op.name} has no field {unknown[0]!r} "
                           f"(fields: {', '.join(layout) or 'none'})")
        values = {}
        for name in layout:
            if name in fields:
                value = fields[name]
            elif _is_flags(op):
                value = 0
            elif name in _DEFAULTS.get(op, {}):
                value = _DEFAULTS[op][name]
            else:
                raise AsmError(f"{where}{op.name} needs {name}")
            try:
                values[name] = _field_value(op, name, value)
            except AsmError as exc:
                raise AsmError(f"{where}{exc}") from None
        self._code.append((op, values, where))
        return self.here - 1

    def word(self, *words):
        """Append raw 32-bit words to the code."""
        for w in words:
            self._code.append(_data_word(w))

    def data(self, name, words, *, where=""):
        """A block of 32-bit words after the code, its first word labelled ``name``."""
        self._define(name, where)
        self._data.append((name, [_data_word(w) for w in words]))

    def assemble(self):
        """The program words. Resolves labels into ``symbols``."""
        symbols = dict(self._labels)
        addr = len(self._code)
        for name, words in self._data:
            symbols[name] = addr
            addr += len(words)
        if self.cfg is not None and addr > self.cfg.program_words:
            raise AsmError(f"the program takes {addr} words; the program memory has "
                           f"{self.cfg.program_words}")
        out = []
        for item in self._code:
            if isinstance(item, int):
                out.append(item)
                continue
            op, values, where = item
            fields = {}
            for name, value in values.items():
                if isinstance(value, tuple):
                    label, offset = value
                    if label not in symbols:
                        raise AsmError(f"{where}{op.name}: undefined label {label!r}")
                    value = _field_value(op, name, symbols[label] + offset)
                fields[name] = value
            out.append(encode(op, **fields))
        for _, words in self._data:
            out.extend(words)
        self.symbols = symbols
        return out

    def listing(self, addresses=True):
        """The disassembly of the program, with its own label names."""
        words = self.assemble()
        names = {}
        for name, addr in self.symbols.items():
            names.setdefault(addr, name)
        return disassemble(words, self.code_words, names, addresses=addresses)


def _tokens(text):
    return text.replace(",", " ").split()


def parse(text, cfg=None):
    """An `Assembler` holding the program of ``text`` (see the module docstring)."""
    asm = Assembler(cfg)
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: "
        line = line.split(";", 1)[0]
        while (match := _LABELS.match(line)):
            asm.label(match.group(1), where=where)
            line = line[match.end():]
        tokens = _tokens(line)
        if not tokens:
            continue
        head, args = tokens[0], tokens[1:]
        try:
            if head.lower() == ".word":
                asm.word(*args)
            elif head.lower() == ".data":
                if not args:
                    raise AsmError(".data needs a name")
                asm.data(args[0], args[1:], where=where)
            elif head.startswith("."):
                raise AsmError(f"unknown directive {head!r} (.word, .data)")
            else:
                op = _opcode(head)
                asm.emit(op, where=where, **_operands(op, args))
        except AsmError as exc:
            msg = str(exc)
            raise AsmError(msg if msg.startswith(where) else where + msg) from None
    return asm


def _operands(op, args):
    fields, positional = {}, []
    for arg in args:
        if "=" in arg:
            name, _, value = arg.partition("=")
            name = name.lower()
            if name in fields:
                raise AsmError(f"{op.name}: {name} given twice")
            fields[name] = value
        elif fields:
            raise AsmError(f"{op.name}: positional operand {arg!r} after field=value")
        else:
            positional.append(arg)
    if _is_flags(op):
        for arg in positional:
            name = arg.lower()
            if name not in OPERANDS[op]:
                raise AsmError(f"{op.name}: {arg!r} is not one of its flags "
                               f"({', '.join(OPERANDS[op])})")
            if name in fields:
                raise AsmError(f"{op.name}: {name} given twice")
            fields[name] = 1
        return fields
    order = OPERANDS[op]
    if op in _DEFAULTS and len(positional) < len(order):
        order = tuple(n for n in order if n not in _DEFAULTS[op])
    if len(positional) > len(order):
        raise AsmError(f"{op.name} takes {len(OPERANDS[op])} operand(s) "
                       f"({', '.join(OPERANDS[op]) or 'none'}), got {len(positional)}")
    for name, value in zip(order, positional):
        if name in fields:
            raise AsmError(f"{op.name}: {name} given twice")
        fields[name] = value
    return fields


def assemble(text, cfg=None):
    """The program words of assembly ``text``."""
    return parse(text, cfg).assemble()


def format_instruction(op, fields, names=None):
    """One instruction in the text syntax; ``names`` maps addresses to labels."""
    names = names or {}
    if _is_flags(op):
        flags = [name for name in OPERANDS[op] if fields[name]]
        return " ".join([op.name] + flags)
    operands = []
    for name in OPERANDS[op]:
        value = fields[name]
        if isinstance(value, enum.Enum):
            if _DEFAULTS.get(op, {}).get(name) != value:
                operands.append(value.name)
        elif (op, name) in ADDRESS_FIELDS and value in names:
            operands.append(names[value])
        else:
            operands.append(str(value))
    return op.name + (" " + ", ".join(operands) if operands else "")


def _check_words(words):
    out = []
    for i, w in enumerate(words):
        if not isinstance(w, int) and not hasattr(w, "__index__"):
            raise AsmError(f"word {i}: {w!r} is not an integer")
        w = int(w)
        if not 0 <= w <= _MASK:
            raise AsmError(f"word {i}: {w:#x} is not a {WORD_BITS}-bit word")
        out.append(w)
    return out


def _decoded(words, code_words):
    """[(op, fields) or None] of the code words, and the code length."""
    end = len(words) if code_words is None else code_words
    if not 0 <= end <= len(words):
        raise AsmError(f"code_words {code_words} outside 0..{len(words)}")
    out, i = [], 0
    while i < end:
        try:
            op, fields = decode(words[i])
        except IsaError:
            op, fields = None, None
        if code_words is None and op in (Opcode.LOAD, Opcode.LAYER) and fields["addr"] > i:
            end = min(end, fields["addr"])
        out.append((op, fields) if op is not None else None)
        i += 1
    return out[:end], end


def _fresh(base, taken):
    """``base``, or ``base_k`` if taken; marks it taken."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def disassemble(words, code_words=None, names=None, addresses=False):
    """Assembly text of ``words`` that assembles back to them (see the module docstring).
    ``names`` maps addresses to label names; ``addresses`` adds each word's address as a
    comment."""
    words = _check_words(words)
    code, end = _decoded(words, code_words)
    names = {a: n for a, n in (names or {}).items() if 0 <= a <= len(words)}
    for a, n in names.items():
        if not _NAME.match(n):
            raise AsmError(f"{n!r} is not a label name")
    taken = set(names.values())
    for item in code:
        if item is None:
            continue
        op, fields = item
        for name, value in fields.items():
            if (op, name) in ADDRESS_FIELDS and value <= len(words) and value not in names:
                names[value] = _fresh(f"{'L' if value < end else 'D'}{value}", taken)
    lines = []
    for addr, item in enumerate(code):
        if addr in names:
            lines.append(f"{names[addr]}:")
        if item is None:
            text, note = f".word {words[addr]:#010x}", "  ; not an instruction"
        else:
            text, note = format_instruction(*item, names), ""
        if addresses:
            note = f"  ; {addr}" + note.replace("  ;", ",")
        lines.append(f"    {text:<28}{note}".rstrip())
    # the data: a block from the end of the code and from every named address after it
    if end < len(words):
        if end not in names:
            names[end] = _fresh(f"D{end}", taken)
        starts = sorted(a for a in names if end <= a < len(words))
        for start, stop in zip(starts, starts[1:] + [len(words)]):
            body = "".join(f" {w:#010x}" for w in words[start:stop])
            note = f"  ; {start}" if addresses else ""
            lines.append(f"    .data {names[start]}{body}{note}")
        if len(words) in names:
            lines.append(f"    .data {names[len(words)]}")
    elif len(words) in names:
        lines.append(f"{names[len(words)]}:")
    return "\n".join(lines) + "\n"
