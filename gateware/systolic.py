"""Output-stationary systolic array of int8 x int8 -> int32 multiply-accumulates.

Built in layers, as Gemmini does: `ProcessingElement`, then `SystolicGrid` (an R x C
mesh of them plus one result bus per column), then `SystolicArray` (input skew, output
deskew, stream edges with backpressure). Inside the grid data only ever moves forward
with a valid bit; a bubble at the input is a bubble everywhere, and nothing stalls.

A tile is C[m0:m0+R, n0:n0+C] = A[m0:m0+R, :] @ B[:, n0:n0+C]: one input beat per
reduction step k carries A's column k and B's row k (`layouts.feed_layout`), the beat
with ``last`` closes the tile, and the tile leaves as R row beats (`layouts.result_layout`).
Tiles follow one another back to back: PE(i, j) finishes tile t and starts tile t+1 in
the same cycle. Shapes that are not multiples of R x C are the feeder's job: it sends
zeros in the unused lanes and drops the unused results.
"""

from amaranth import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .layouts import feed_layout, result_layout

__all__ = ["ProcessingElement", "SystolicGrid", "SystolicArray"]


class ProcessingElement(wiring.Component):
    """One multiply-accumulate of the output-stationary grid.

    Members
    -------
    a_in, valid_in, last_in : In   operand from the west, with the beat's valid and last
    b_in                    : In   operand from the north
    a_out, valid_out, last_out, b_out : Out   the same, registered, for the neighbours
    result, done            : Out  a finished dot product, ``done`` high for one cycle

    Timing: operands at cycle t reach the neighbours at t+1; their product is registered
    at t+1 (an unregistered MULT18X18D output caps an ECP5 near 67 MHz) and summed at t+2.
    If ``last_in`` was high at t, ``result`` holds the whole sum and ``done`` is high at
    t+2, and the accumulator restarts from zero for the next tile in the same cycle.
    """

    def __init__(self, width=8, acc_width=32):
        self._acc_width = acc_width
        super().__init__({
            "a_in": In(signed(width)), "valid_in": In(1), "last_in": In(1),
            "b_in": In(signed(width)),
            "a_out": Out(signed(width)), "valid_out": Out(1), "last_out": Out(1),
            "b_out": Out(signed(width)),
            "result": Out(signed(acc_width)), "done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.d.sync += [
            self.a_out.eq(self.a_in), self.valid_out.eq(self.valid_in),
            self.last_out.eq(self.last_in), self.b_out.eq(self.b_in),
        ]

        product = Signal(signed(2 * len(self.a_in)))
        p_valid = Signal()
        p_last = Signal()
        m.d.sync += [
            product.eq(self.a_in * self.b_in),
            p_valid.eq(self.valid_in),
            p_last.eq(self.last_in),
        ]

        acc = Signal(signed(self._acc_width))
        m.d.sync += self.done.eq(0)
        with m.If(p_valid):
            with m.If(p_last):
                m.d.sync += [self.result.eq(acc + product), self.done.eq(1), acc.eq(0)]
            with m.Else():
                m.d.sync += acc.eq(acc + product)
        return m


class SystolicGrid(wiring.Component):
    """R x C processing elements, A flowing east, B flowing south, results leaving on
    one bus per column.

    Members
    -------
    a, valid, last : In   per row: the west operand with its valid and last
    b              : In   per column: the north operand
    col, col_valid : Out  per column: the result of whichever PE of the column finished

    Timing: row i's operands must arrive i cycles after row 0's and column j's j cycles
    after column 0's (the skew `SystolicArray` adds). PE(i, j) then finishes a tile whose
    last step entered row 0 / column 0 at t at cycle t+i+j+2, and its result is on
    ``col[j]`` at t+i+j+3. Tiles whose last steps are at least R cycles apart never
    finish in the same column in the same cycle, which is what lets a column share one
    bus (an OR of the PEs' results).
    """

    def __init__(self, rows, cols, width=8, acc_width=32):
        self._rows, self._cols = rows, cols
        self._width, self._acc_width = width, acc_width
        super().__init__({
            "a": In(data.ArrayLayout(signed(width), rows)),
            "valid": In(rows), "last": In(rows),
            "b": In(data.ArrayLayout(signed(width), cols)),
            "col": Out(data.ArrayLayout(signed(acc_width), cols)),
            "col_valid": Out(cols),
        })

    def elaborate(self, platform):
        m = Module()
        R, C = self._rows, self._cols
        pe = [[ProcessingElement(self._width, self._acc_width) for _ in range(C)] for _ in range(R)]
        for i in range(R):
            for j in range(C):
                m.submodules[f"pe_{i}_{j}"] = p = pe[i][j]
                if j == 0:
                    m.d.comb += [p.a_in.eq(self.a[i]), p.valid_in.eq(self.valid[i]),
                                 p.last_in.eq(self.last[i])]
                else:
                    west = pe[i][j - 1]
                    m.d.comb += [p.a_in.eq(west.a_out), p.valid_in.eq(west.valid_out),
                                 p.last_in.eq(west.last_out)]
                m.d.comb += p.b_in.eq(self.b[j] if i == 0 else pe[i - 1][j].b_out)

        for j in range(C):
            bus = 0
            for i in range(R):
                bus = bus | (pe[i][j].result.as_unsigned() & pe[i][j].done.replicate(self._acc_width))
            m.d.sync += [
                self.col[j].eq(bus),
                self.col_valid[j].eq(Cat(pe[i][j].done for i in range(R)).any()),
            ]
        return m


class SystolicArray(wiring.Component):
    """The grid behind stream edges: skewed feeds in, deskewed result rows out.

    Members
    -------
    i : In(stream of `feed_layout(R, C)`)    one reduction step per beat
    o : Out(stream of `result_layout(C)`)    R row beats per tile, ``last`` on row R-1

    Backpressure exists only here. A beat with ``last`` is accepted only when the output
    FIFO has room reserved for the tile's R rows and at least R cycles have passed since
    the previous ``last`` (so column buses never collide); other beats are always
    accepted. With a ready sink and tiles of K >= R steps, the array takes a beat every
    cycle: utilization K / K. A tile of K < R steps costs R cycles.

    Timing: a tile whose last beat is accepted at cycle t has row r in the FIFO at
    t + r + C + 4 and on ``o`` one cycle later at the earliest.
    """

    def __init__(self, rows, cols, width=8, acc_width=32, fifo_depth=None):
        self._rows, self._cols = rows, cols
        self._width, self._acc_width = width, acc_width
        self._fifo_depth = fifo_depth or 4 * rows
        if self._fifo_depth < rows:
            raise ValueError("the output FIFO must hold at least one tile")
        super().__init__({
            "i": In(stream.Signature(feed_layout(rows, cols, width))),
            "o": Out(stream.Signature(result_layout(cols, acc_width))),
        })

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.array_rows, cfg.array_cols, cfg.act_bits, cfg.acc_bits)

    def elaborate(self, platform):
        m = Module()
        R, C, D = self._rows, self._cols, self._fifo_depth
        m.submodules.grid = grid = SystolicGrid(R, C, self._width, self._acc_width)
        m.submodules.fifo = out = fifo.SyncFIFOBuffered(width=len(self.o.payload.as_value()), depth=D)

        # Admission: rows reserved in the FIFO (in flight or stored) and the spacing of
        # tile ends.
        pending = Signal(range(D + 1))
        since_last = Signal(range(R + 1), init=R)
        last_ok = (pending + R <= D) & (since_last >= R)
        m.d.comb += self.i.ready.eq(~self.i.payload.last | last_ok)
        take = self.i.valid & self.i.ready
        closes = take & self.i.payload.last
        popped = self.o.valid & self.o.ready
        m.d.sync += pending.eq(pending + (closes * R) - popped)
        with m.If(closes):
            m.d.sync += since_last.eq(1)
        with m.Elif(since_last < R):
            m.d.sync += since_last.eq(since_last + 1)

        # Skew: row i and column j enter the grid i and j cycles after the beat.
        for r in range(R):
            a, v, l = self.i.payload.a[r], take, self.i.payload.last
            for _ in range(r + 1):
                a_d, v_d, l_d = Signal.like(a), Signal(), Signal()
                m.d.sync += [a_d.eq(a), v_d.eq(v), l_d.eq(l)]
                a, v, l = a_d, v_d, l_d
            m.d.comb += [grid.a[r].eq(a), grid.valid[r].eq(v), grid.last[r].eq(l)]
        for c in range(C):
            b = self.i.payload.b[c]
            for _ in range(c + 1):
                b_d = Signal.like(b)
                m.d.sync += b_d.eq(b)
                b = b_d
            m.d.comb += grid.b[c].eq(b)

        # Deskew: column j is delayed C-1-j more cycles, so a row's C results line up.
        row = Signal(data.ArrayLayout(signed(self._acc_width), C))
        row_valid = Signal()
        for c in range(C):
            v, valid = grid.col[c], grid.col_valid[c]
            for _ in range(C - 1 - c):
                v_d, valid_d = Signal.like(v), Signal()
                m.d.sync += [v_d.eq(v), valid_d.eq(valid)]
                v, valid = v_d, valid_d
            m.d.comb += row[c].eq(v)
            if c == 0:
                m.d.comb += row_valid.eq(valid)

        # Rows of a tile always arrive in order 0..R-1, so counting them marks `last`.
        row_index = Signal(range(R))
        payload = Signal(result_layout(C, self._acc_width))
        m.d.comb += [payload.c.eq(row), payload.last.eq(row_index == R - 1),
                     out.w_data.eq(payload), out.w_en.eq(row_valid)]
        with m.If(row_valid):
            m.d.sync += row_index.eq(Mux(row_index == R - 1, 0, row_index + 1))

        m.d.comb += [
            self.o.payload.eq(out.r_data), self.o.valid.eq(out.r_rdy), out.r_en.eq(self.o.ready),
        ]
        return m
