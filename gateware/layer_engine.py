"""The frozen network's engine: conv unit, systolic array and the memories they use.

This is the block the top level embeds: the sequencer loads a layer descriptor and
strobes ``start``; the host link loads samples, weights and biases through ``load`` and
reads activations and logits through ``rd_*``.
"""

import math

from amaranth import Module, Mux, Signal, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from firmware.layers import ADDR_BITS, ConvDescriptor
from .conv import ConvUnit
from .ram import ram_style, read_register
from .systolic import SystolicArray

__all__ = ["LayerEngine", "MEM_ACT", "MEM_WEIGHT", "MEM_BIAS", "MEM_LOGIT"]

MEM_ACT, MEM_WEIGHT, MEM_BIAS, MEM_LOGIT = 0, 1, 2, 3


def load_layout(cols, acc_width=32):
    """A word written by the host link: memory, word address, raw bits (lanes packed
    little-end first, each lane as wide as the memory's)."""
    return data.StructLayout({
        "mem": unsigned(2), "addr": unsigned(ADDR_BITS), "data": unsigned(acc_width * cols),
    })


class LayerEngine(wiring.Component):
    """Runs one frozen layer per ``start``.

    Members
    -------
    start, desc, busy : as `ConvUnit`
    load    : In(stream of `load_layout`)  always ready; MEM_ACT words go to every row's
              copy of the activation buffer. A load takes the cycle's write port from
              the conv unit, which then waits (loads may overlap a run: the next sample
              can be loaded into a free region while a layer runs).
    rd_mem, rd_addr : In   MEM_ACT or MEM_LOGIT word to read (only while not busy)
    rd_data         : Out  its lanes two cycles later (int8 lanes sign-extended, or int16
                           lanes)

    Memories: R copies of `act_words` x C int8 (one read port each, so R rows read R
    different pixels per cycle), weights `weight_words / C` x C int8, biases
    `bias_words / C` x C int32 (LUT RAM), logits ceil(max_classes / C) x C int16.

    Every block RAM is read through a register of its own (reset-less, loaded when the
    port's ``en`` is high), which the build folds into the RAM's output register
    (`platforms.outreg`): a DP16KD's clock-to-out without it is 5.8 ns, with it 1.0 ns.
    So the conv unit's activation and weight ports answer two ``en`` cycles after an
    address (the bias port, in LUT RAM, one cycle), and ``rd_data`` two cycles after.
    """

    def __init__(self, cfg):
        self._cfg = cfg
        C = cfg.array_cols
        super().__init__({
            "start": In(1), "desc": In(ConvDescriptor), "busy": Out(1),
            "load": In(stream.Signature(load_layout(C, cfg.acc_bits))),
            "rd_mem": In(2), "rd_addr": In(ADDR_BITS),
            "rd_data": Out(16 * C),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        R, C = cfg.array_rows, cfg.array_cols
        m.submodules.array = array = SystolicArray.from_config(cfg)
        m.submodules.conv = conv = ConvUnit(R, C, cfg.acc_bits)
        wiring.connect(m, conv.feed, array.i)
        wiring.connect(m, array.o, conv.result)
        m.d.comb += [conv.start.eq(self.start), conv.desc.eq(self.desc), self.busy.eq(conv.busy)]

        wide = Signal()                             # this layer writes logits
        with m.If(self.start & ~conv.busy):
            m.d.sync += wide.eq(self.desc.wide)

        load = self.load.payload
        m.d.comb += self.load.ready.eq(1)
        loading = self.load.valid
        out = conv.o.payload
        m.d.comb += conv.o.ready.eq(~loading)
        writing = conv.o.valid & ~loading

        # Activation buffer: one copy per array row, written together.
        act_w = Signal(8 * C)
        for j in range(C):
            m.d.comb += act_w.word_select(j, 8).eq(out.data[j][:8])
        copies = []                                 # each copy's registered word
        for r in range(R):
            mem = memory.Memory(shape=unsigned(8 * C), depth=cfg.act_words, init=[])
            m.submodules[f"act{r}"] = mem
            wp = mem.write_port()
            rp = mem.read_port()
            m.d.comb += [
                wp.en.eq(Mux(loading, load.mem == MEM_ACT, writing & ~wide)),
                wp.addr.eq(Mux(loading, load.addr, out.addr)),
                wp.data.eq(Mux(loading, load.data[:8 * C], act_w)),
            ]
            port = getattr(conv, f"act{r}")
            if r == 0:
                # the host reads through row 0's port while the engine is idle
                m.d.comb += [rp.addr.eq(Mux(conv.busy, port.addr, self.rd_addr)),
                             rp.en.eq(Mux(conv.busy, port.en, 1))]
            else:
                m.d.comb += [rp.addr.eq(port.addr), rp.en.eq(port.en)]
            copies.append(read_register(m, rp, f"act{r}_q"))
            m.d.comb += port.data.eq(copies[-1])

        for name, mem_id, width, depth in (("weight", MEM_WEIGHT, 8, cfg.weight_words // C),
                                           ("bias", MEM_BIAS, cfg.acc_bits, cfg.bias_words // C)):
            # the biases are few but C * 32 bits wide (8 DP16KD at C = 8): LUT RAM
            mem = memory.Memory(shape=unsigned(width * C), depth=depth, init=[],
                                attrs=ram_style(depth) if name == "bias" else None)
            m.submodules[name] = mem
            wp, rp = mem.write_port(), mem.read_port()
            m.d.comb += [wp.en.eq(loading & (load.mem == mem_id)), wp.addr.eq(load.addr),
                         wp.data.eq(load.data[:width * C])]
            port = getattr(conv, name)
            m.d.comb += [rp.addr.eq(port.addr), rp.en.eq(port.en),
                         port.data.eq(read_register(m, rp, "weight_q") if name == "weight" else rp.data)]

        logit_depth = math.ceil(cfg.max_classes / C)
        logits = memory.Memory(shape=unsigned(16 * C), depth=logit_depth, init=[])
        m.submodules.logits = logits
        lw, lr = logits.write_port(), logits.read_port()
        logit_w = Signal(16 * C)
        for j in range(C):
            m.d.comb += logit_w.word_select(j, 16).eq(out.data[j])
        m.d.comb += [lw.en.eq(writing & wide), lw.addr.eq(out.addr),
                     lw.data.eq(logit_w), lr.addr.eq(self.rd_addr)]

        logit_q = read_register(m, lr, "logit_q")
        act_lanes = Signal(16 * C)
        for j in range(C):
            m.d.comb += act_lanes.word_select(j, 16).eq(copies[0].word_select(j, 8).as_signed())
        rd_mem = [Signal(2, name=f"rd_mem{t}") for t in range(2)]
        m.d.sync += [rd_mem[0].eq(self.rd_mem), rd_mem[1].eq(rd_mem[0])]
        m.d.comb += self.rd_data.eq(Mux(rd_mem[1] == MEM_LOGIT, logit_q, act_lanes))
        return m
