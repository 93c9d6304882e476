"""Sequencer: fetches the device program and drives the units.

# Ref: docs/isa.md (the semantics of every instruction); firmware/isa.py (the encoding).
"""

import contextlib

from amaranth import Array, Const, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from firmware.isa import (ARG_BITS, ARGS, COUNT_BITS, CONV_WORDS, LOOP_DEPTH, OP_BITS, Cond,
                          Error, Instruction, Opcode, Phase, Reg, layout_words, register_layout)
from firmware.layers import ConvDescriptor

from .config import DEFAULT, AccelConfig

__all__ = ["Sequencer"]

_REGS = [Reg.ADAPTER, Reg.CACHE, Reg.GATHER, Reg.LR, Reg.SEED]


class Sequencer(wiring.Component):
    """Runs a program from the program memory, one instruction at a time.

    Members
    -------
    start : In(1),  entry : In(16)
        Strobe: run from ``entry`` (ignored while running). Clears ``done``, ``error``,
        the loop stack and the phase.
    abort : In(1)
        Strobe: stop at once (neither done nor error).
    running, done : Out(1),  error : Out(`firmware.isa.Error`)
        State of the last program: ``done`` after HALT, ``error`` its stop reason.
    pc, index : Out(16),  phase : Out(`firmware.isa.Phase`),  updates : Out(32)
        The program counter, the sample index, the phase whose cycles count, and the
        UPDATE instructions executed (zeroed by ``clear_counters``).
    prog_addr : Out(16),  prog_data : In(32)
        The program memory's read port: ``prog_data`` is the word at the ``prog_addr``
        of the previous cycle.
    adapter, cache, gather, lr : Out(register layouts),  seed : Out(32)
        The LOAD registers (`firmware.isa.register_layout`), held between LOADs.
    desc : Out(ConvDescriptor),  layer_start : Out(1),  layer_busy : In(1)
        LAYER: the descriptor is copied while the previous layer may run; ``layer_start``
        pulses once the engine is idle (the engine takes ``desc`` in that cycle).
    move : Out(1),  move_src : Out(),  gather_start : Out(1),  gather_lora,
    gather_fill : Out(1),  gather_busy : In(1)
        MOVE and GATHER strobes for the gather unit (``move_src`` = index * stride, the
        sample's first byte); both wait until the unit is idle again.
    lookup : Out(1),  lookup_ready : In(1),  answer : In(1),  answer_hit : In(1),
    reader_busy : In(1)
        LOOKUP: a cache request (``lookup`` held until ``lookup_ready``), then the first
        beat of its answer (``answer`` high in the cycle it is visible, ``answer_hit``);
        ``reader_busy`` while a hit is still streaming to the LoRA engine.
    update, clear_grads, reset_moments, seed_load, invalidate, clear_counters : Out(1)
        Strobes of UPDATE and CLEAR.
    units_busy : In(1)
        Any unit busy: SYNC, PHASE, LOAD, CLEAR and HALT wait for it to fall.
    cache_error : In(1)
        The cache rejected a fill: the program stops with Error.CACHE.

    Timing
    ------
    An instruction takes a fetch cycle, a decode cycle and at least one execute cycle,
    plus its waits; LOAD and LAYER one more cycle per data word. The strobes to the
    units (``layer_start``, ``move``, ``gather_start``, UPDATE's and CLEAR's) are
    registered: each is high in the cycle after the one that issues it, so that no
    unit's start logic hangs off the sequencer's state decode. A unit is busy from the
    cycle after its strobe; the next instruction's execute cycle comes after that.
    """

    def __init__(self, cfg=DEFAULT):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        self._cfg = cfg
        self._src_bits = bits_for(cfg.sample_words)
        super().__init__({
            "start": In(1), "entry": In(COUNT_BITS), "abort": In(1),
            "running": Out(1), "done": Out(1), "error": Out(Error),
            "pc": Out(COUNT_BITS), "index": Out(COUNT_BITS), "phase": Out(Phase),
            "updates": Out(32),
            "prog_addr": Out(COUNT_BITS), "prog_data": In(32),
            **{reg.name.lower(): Out(register_layout(reg, cfg)) for reg in _REGS},
            "desc": Out(ConvDescriptor), "layer_start": Out(1), "layer_busy": In(1),
            "move": Out(1), "move_src": Out(self._src_bits),
            "gather_start": Out(1), "gather_lora": Out(1), "gather_fill": Out(1),
            "gather_busy": In(1),
            "lookup": Out(1), "lookup_ready": In(1), "answer": In(1), "answer_hit": In(1),
            "reader_busy": In(1),
            "update": Out(1), "clear_grads": Out(1), "reset_moments": Out(1),
            "seed_load": Out(1), "invalidate": Out(1), "clear_counters": Out(1),
            "units_busy": In(1), "cache_error": In(1),
        })

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()

        # LOAD and LAYER targets, each backed by whole 32-bit words
        targets = [(reg.value, getattr(self, reg.name.lower()), register_layout(reg, cfg))
                   for reg in _REGS]
        backing = {}
        for value, port, layout in targets:
            words = layout_words(layout)
            backing[value] = Signal(32 * words, name=f"reg_{value}")
            m.d.comb += port.as_value().eq(backing[value][:layout.size])
        desc_bits = Signal(32 * CONV_WORDS)
        m.d.comb += self.desc.as_value().eq(desc_bits[:ConvDescriptor.size])

        ir = Signal(Instruction)
        arg = ir.arg
        op = ir.op
        pc = self.pc
        depth_bits = ceil_log2(LOOP_DEPTH + 1)
        sp = Signal(depth_bits)
        stack_pc = Array(Signal(COUNT_BITS, name=f"loop_pc{i}") for i in range(LOOP_DEPTH))
        stack_n = Array(Signal(COUNT_BITS, name=f"loop_n{i}") for i in range(LOOP_DEPTH))
        hit = Signal()

        # data-word copies (LOAD, LAYER)
        copy_addr = Signal(COUNT_BITS + 1)
        copy_k = Signal(range(max(CONV_WORDS, *(layout_words(l) for _, _, l in targets)) + 1))
        copy_n = Signal.like(copy_k)
        copy_target = Signal(range(len(_REGS) + 1))     # len(_REGS): the descriptor
        waited = Signal()                               # a strobed unit had its cycle to go busy

        words_of = Array(layout_words(l) for _, _, l in targets)
        defined = {o.value: layout.size for o, layout in ARGS.items()}
        unused = Array(Const(((1 << ARG_BITS) - 1) & ~((1 << defined.get(v, 0)) - 1), ARG_BITS)
                       for v in range(1 << OP_BITS))
        # a fill error left from an earlier program (CLEAR cache or counters drops it)
        stale_error = Signal()
        with m.If(~self.cache_error):
            m.d.sync += stale_error.eq(0)

        def next_insn():
            m.next = "FETCH"

        def fail(code):
            m.d.sync += [self.error.eq(code), self.running.eq(0)]
            m.next = "IDLE"

        @contextlib.contextmanager
        def state(name):
            with m.State(name):
                yield
                with m.If(self.abort):
                    m.d.sync += self.running.eq(0)
                    m.next = "IDLE"

        # the strobes are registers, low unless the cycle before issued them
        strobes = [self.layer_start, self.move, self.gather_start, self.update,
                   self.clear_grads, self.reset_moments, self.seed_load, self.invalidate,
                   self.clear_counters]
        m.d.sync += [s.eq(0) for s in strobes]

        m.d.comb += self.prog_addr.eq(pc)
        with m.If(self.clear_counters):
            m.d.sync += self.updates.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [pc.eq(self.entry), sp.eq(0), self.running.eq(1),
                                 stale_error.eq(self.cache_error),
                                 self.done.eq(0), self.error.eq(Error.NONE),
                                 self.phase.eq(Phase.NONE)]
                    m.next = "FETCH"

            with state("FETCH"):
                with m.If(self.cache_error & ~stale_error):
                    fail(Error.CACHE)
                with m.Elif(pc >= cfg.program_words):
                    fail(Error.PC)
                with m.Else():
                    m.next = "DECODE"

            with state("DECODE"):
                m.d.sync += [ir.eq(self.prog_data), pc.eq(pc + 1), waited.eq(0)]
                m.next = "EXEC"

            with state("EXEC"):
                with m.Switch(op):
                    with m.Case(Opcode.HALT):
                        with m.If(~self.units_busy):
                            m.d.sync += [self.running.eq(0), self.done.eq(1)]
                            m.next = "IDLE"
                    with m.Case(Opcode.SYNC):
                        with m.If(~self.units_busy):
                            next_insn()
                    with m.Case(Opcode.PHASE):
                        with m.If(~self.units_busy):
                            m.d.sync += self.phase.eq(arg.phase.phase)
                            next_insn()
                    with m.Case(Opcode.LOAD):
                        with m.If(arg.load.reg.as_value() >= len(_REGS)):
                            fail(Error.OPCODE)
                        with m.Elif(~self.units_busy):
                            m.d.sync += [copy_addr.eq(arg.load.addr), copy_k.eq(0),
                                         copy_n.eq(words_of[arg.load.reg.as_value()]),
                                         copy_target.eq(arg.load.reg.as_value())]
                            m.next = "COPY"
                    with m.Case(Opcode.LOOP):
                        with m.If((arg.loop.count == 0) | (sp == LOOP_DEPTH)):
                            fail(Error.LOOP)
                        with m.Else():
                            m.d.sync += [stack_pc[sp].eq(pc), stack_n[sp].eq(arg.loop.count),
                                         sp.eq(sp + 1)]
                            next_insn()
                    with m.Case(Opcode.ENDLOOP):
                        top = sp - 1
                        with m.If(sp == 0):
                            fail(Error.LOOP)
                        with m.Elif(stack_n[top] > 1):
                            m.d.sync += [stack_n[top].eq(stack_n[top] - 1), pc.eq(stack_pc[top])]
                            next_insn()
                        with m.Else():
                            m.d.sync += sp.eq(top)
                            next_insn()
                    with m.Case(Opcode.SETIDX):
                        m.d.sync += self.index.eq(arg.setidx.index)
                        next_insn()
                    with m.Case(Opcode.INCIDX):
                        m.d.sync += self.index.eq(self.index + 1)
                        next_insn()
                    with m.Case(Opcode.MOVE):
                        m.next = "MOVE"
                    with m.Case(Opcode.LAYER):
                        m.d.sync += [copy_addr.eq(arg.layer.addr), copy_k.eq(0),
                                     copy_n.eq(CONV_WORDS), copy_target.eq(len(_REGS))]
                        m.next = "COPY"
                    with m.Case(Opcode.GATHER):
                        with m.If(self.index >= cfg.max_samples):
                            fail(Error.INDEX)
                        with m.Elif(~self.layer_busy & ~self.gather_busy & ~self.reader_busy):
                            m.d.sync += [self.gather_start.eq(1),
                                         self.gather_lora.eq(arg.gather.lora),
                                         self.gather_fill.eq(arg.gather.fill)]
                            m.next = "WAIT_GATHER"
                    with m.Case(Opcode.LOOKUP):
                        with m.If(self.index >= cfg.max_samples):
                            fail(Error.INDEX)
                        with m.Elif(~self.reader_busy):
                            m.next = "LOOKUP"
                    with m.Case(Opcode.BRANCH):
                        cond = arg.branch.cond
                        taken = ((cond == Cond.ALWAYS) | ((cond == Cond.HIT) & hit) |
                                 ((cond == Cond.MISS) & ~hit))
                        with m.If(cond.as_value() > Cond.MISS.value):
                            fail(Error.OPCODE)
                        with m.Else():
                            with m.If(taken):
                                m.d.sync += pc.eq(arg.branch.target)
                            next_insn()
                    with m.Case(Opcode.UPDATE):
                        with m.If(~self.gather_busy & ~self.reader_busy):
                            m.d.sync += [self.update.eq(1), self.updates.eq(self.updates + 1)]
                            next_insn()
                    with m.Case(Opcode.CLEAR):
                        with m.If(~self.units_busy):
                            c = arg.clear
                            m.d.sync += [self.clear_grads.eq(c.grads), self.reset_moments.eq(c.moments),
                                         self.seed_load.eq(c.seed), self.invalidate.eq(c.cache),
                                         self.clear_counters.eq(c.counters)]
                            next_insn()
                    with m.Default():
                        fail(Error.OPCODE)
                # unused argument bits make a word undefined
                with m.If((arg.bits & unused[op.as_value()]) != 0):
                    fail(Error.OPCODE)

            with state("COPY"):
                # prog_addr shows copy_addr this cycle; its word is stored next cycle
                m.d.comb += self.prog_addr.eq(copy_addr)
                with m.If(copy_addr >= cfg.program_words):
                    fail(Error.PC)
                with m.Else():
                    m.next = "STORE"

            with state("STORE"):
                m.d.comb += self.prog_addr.eq(copy_addr)
                with m.Switch(copy_target):
                    for value, _, _ in targets:
                        with m.Case(value):
                            m.d.sync += backing[value].word_select(copy_k, 32).eq(self.prog_data)
                    with m.Case(len(_REGS)):
                        m.d.sync += desc_bits.word_select(copy_k, 32).eq(self.prog_data)
                m.d.sync += [copy_k.eq(copy_k + 1), copy_addr.eq(copy_addr + 1)]
                with m.If(copy_k + 1 == copy_n):
                    with m.If(copy_target == len(_REGS)):
                        m.next = "START_LAYER"
                    with m.Else():
                        next_insn()
                with m.Else():
                    m.next = "COPY"

            with state("START_LAYER"):
                with m.If(~self.layer_busy):
                    m.d.sync += self.layer_start.eq(1)
                    next_insn()

            # the sample's range and its check take a cycle each: neither carry chain
            # lies on the path of the strobe into the gather unit
            src = Signal(COUNT_BITS * 2)
            past_end = Signal()
            with state("MOVE"):
                m.d.sync += src.eq(self.index * arg.move.stride)
                m.next = "MOVE_CHECK"

            with state("MOVE_CHECK"):
                m.d.sync += past_end.eq(src + arg.move.stride > cfg.sample_words)
                m.next = "MOVE_GO"

            m.d.comb += self.move_src.eq(src)
            with state("MOVE_GO"):
                with m.If(past_end):
                    fail(Error.INDEX)
                with m.Elif(~self.layer_busy & ~self.gather_busy):
                    m.d.sync += self.move.eq(1)
                    m.next = "WAIT_GATHER"

            with state("WAIT_GATHER"):
                # the unit is busy from the cycle after its strobe
                m.d.sync += waited.eq(1)
                with m.If(waited & ~self.gather_busy):
                    next_insn()

            with state("LOOKUP"):
                m.d.comb += self.lookup.eq(1)
                with m.If(self.lookup_ready):
                    m.next = "ANSWER"

            with state("ANSWER"):
                with m.If(self.answer):
                    m.d.sync += hit.eq(self.answer_hit)
                    next_insn()

        return m

