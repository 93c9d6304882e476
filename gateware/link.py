"""The device side of the host link: UART frames in, host-port accesses, frames out.

# Ref: docs/protocol.md (the contract); host/protocol.py (the host side, and `serve`,
# the same device behaviour in Python, which the tests hold this against).
"""

from contextlib import contextmanager

from amaranth import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import crc, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from firmware.memmap import OFFSET_BITS, PORT_ADDR_BITS, Control, Region, Regs
from firmware.protocol import (CRC_BYTES, ERROR_CMD, IDENTIFY_REGS, MAX_PAYLOAD, MAX_WORDS,
                               MODEL_REGIONS, RESPONSE, STATUS_REGS, STATUS_WORDS, SYNC,
                               WATCHDOG_BYTES,
                               Command, ErrorCode, windows)

from .config import DEFAULT, AccelConfig
from .top import host_port
from .uart import divisor_for

__all__ = ["LinkController", "timeout_cycles", "Command", "ErrorCode", "SYNC", "MAX_PAYLOAD",
           "MAX_WORDS", "WATCHDOG_BYTES", "RESPONSE", "ERROR_CMD"]

CRC32 = crc.catalog.CRC32_ISO_HDLC          # host.protocol.crc32 (zlib.crc32) is the same function
assert CRC_BYTES == 4

# STATUS reads its registers in one sweep that steps over CONTROL
assert STATUS_REGS == tuple(r for r in Regs if STATUS_REGS[0] <= r <= STATUS_REGS[-1]
                            and r != Regs.CONTROL)
assert IDENTIFY_REGS == tuple(Regs)[:len(IDENTIFY_REGS)]


def timeout_cycles(divisor):
    """The watchdog in clock cycles: WATCHDOG_BYTES byte times of 10 bits."""
    return WATCHDOG_BYTES * 10 * divisor


def _reg(r):
    return Region.REGS.value << OFFSET_BITS | r


class LinkController(wiring.Component):
    """Receives request frames, runs them on the accelerator's host port and sends the
    response frames (docs/protocol.md).

    Members
    -------
    rx : In(stream.Signature(8))
        Received bytes (`UartRx`). Always ready: a UART cannot wait.
    tx : Out(stream.Signature(8))
        Response bytes (`UartTx`); the controller waits for ``ready``.
    addr : Out(PORT_ADDR_BITS), wdata : Out(32), we : Out(1), re : Out(1), rdata : In(32),
    rvalid : In(1)
        The master side of `Accelerator`'s host port: one access per cycle, writes in
        order, the read word taken from ``rdata`` when ``rvalid`` comes, any number of
        cycles after ``re`` (one read at a time is outstanding).
    running : In(1)
        The accelerator runs a program: only IDENTIFY, READ of REGS, STATUS and ABORT
        are served.
    loaded : Out(1)
        The model flag (docs/protocol.md): low at reset; set by a LOADED, cleared by a
        WRITE to WEIGHTS or BIASES, both in the cycle after the request's EXEC (before
        its response goes out). A START while it is low gets NO_MODEL and writes nothing.

    Receiving: the frame's payload goes into one of two buffers (the first six payload
    bytes, address and count or entry pc, into registers; the words from byte 4 on into
    the buffer, 256 x 32 bits each) while its CRC is computed; only a frame whose CRC
    matches is handed to the executor, so a corrupt frame touches nothing. A length
    above MAX_PAYLOAD drops the frame at its header, a bad CRC after its last byte, and
    a frame that has had no byte for ``timeout`` cycles is dropped by the watchdog; the
    receiver then hunts for the next 0xA5. The receiver goes on with the next frame (in
    the other buffer) while the executor serves one, so a host may send the next
    request without waiting; a third frame arriving while the second still waits for
    the executor is dropped.

    Executing (checks in the order of `host.protocol.serve`: unknown command, bad
    length, bad address, running, no model; the address check compares the range's first and last
    offsets with constants of the region's `firmware.protocol.Window`, before any word
    is written): WRITE does one port write per word per cycle before the response
    goes out; START and ABORT write CONTROL (a START served counts in the 32-bit START
    count, which STATUS answers after its registers); IDENTIFY, STATUS and READ read a word from
    the port while the previous word's last byte is being sent, computing the response's
    CRC on the fly, so a response leaves with no gaps between bytes. Responses echo
    ``seq``. The first byte of a response is offered 3 cycles after the request's last
    byte arrives (a WRITE of n words: n + 4; a request arriving while the previous
    response goes out waits for its end); a READ word takes 1 cycle plus the port's
    read latency between its predecessor's last byte and its first. Addresses are taken
    modulo 2**PORT_ADDR_BITS.
    """

    def __init__(self, cfg=DEFAULT, timeout=None):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        self._cfg = cfg
        self._timeout = timeout_cycles(divisor_for(cfg)) if timeout is None else timeout
        if self._timeout < 1:
            raise ValueError(f"timeout must be a positive number of cycles, not {timeout!r}")
        super().__init__({
            "rx": In(stream.Signature(8)), "tx": Out(stream.Signature(8)),
            **{name: member.flip() for name, member in host_port().items()},
            "running": In(1), "loaded": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.buffer = buffer = Memory(shape=32, depth=2 * MAX_WORDS, init=[])
        buf_w, buf_r = buffer.write_port(), buffer.read_port()
        m.submodules.rx_crc = rx_crc = CRC32(data_width=8).create()
        m.submodules.tx_crc = tx_crc = CRC32(data_width=8).create()

        # --- receiver ----------------------------------------------------------------------
        byte, got = self.rx.payload, self.rx.valid
        m.d.comb += [self.rx.ready.eq(1), rx_crc.data.eq(byte)]

        r_cmd, r_seq, r_len = Signal(8), Signal(8), Signal(16)
        r_head = Signal(48)             # payload bytes 0..5: address and count, or entry pc
        r_idx = Signal(range(MAX_PAYLOAD))
        r_word = Signal(24)             # the low bytes of the payload word being assembled
        r_crc = Signal(24)              # the CRC field's first three bytes
        r_crc_idx = Signal(2)           # the CRC byte expected next
        r_buf = Signal()                # the buffer the receiver fills
        x_idle = Signal()
        pending = Signal()

        # the watchdog: cycles since the last byte of a frame under way
        quiet = Signal(range(self._timeout + 1))
        waiting = Signal()              # not inside a frame: nothing to time out
        with m.If(got | waiting):
            m.d.sync += quiet.eq(0)
        with m.Else():
            m.d.sync += quiet.eq(quiet + 1)
        expired = quiet == self._timeout

        @contextmanager
        def on_byte(state, in_crc=True):
            """A receiver state inside a frame: its body runs on a byte; the watchdog
            ends the frame after ``timeout`` quiet cycles."""
            with m.State(state):
                with m.If(got):
                    m.d.comb += rx_crc.valid.eq(in_crc)
                    yield
                with m.Elif(expired):
                    m.next = "HUNT"

        with m.FSM(name="receiver"):
            with m.State("HUNT"):
                m.d.comb += [waiting.eq(1), rx_crc.start.eq(1)]
                m.d.sync += r_crc_idx.eq(0)     # the watchdog may have ended a frame mid-CRC
                with m.If(got & (byte == SYNC)):
                    m.next = "CMD"
            with on_byte("CMD"):
                m.d.sync += r_cmd.eq(byte)
                m.next = "SEQ"
            with on_byte("SEQ"):
                m.d.sync += r_seq.eq(byte)
                m.next = "LEN_LO"
            with on_byte("LEN_LO"):
                m.d.sync += r_len[:8].eq(byte)
                m.next = "LEN_HI"
            with on_byte("LEN_HI"):
                length = Cat(r_len[:8], byte)
                m.d.sync += [r_len[8:].eq(byte), r_idx.eq(0)]
                with m.If(length > MAX_PAYLOAD):
                    m.next = "HUNT"
                with m.Elif(length == 0):
                    m.next = "CRC"
                with m.Else():
                    m.next = "PAYLOAD"
            with on_byte("PAYLOAD"):
                m.d.sync += [r_idx.eq(r_idx + 1), r_word.eq(Cat(r_word[8:], byte))]
                with m.If(r_idx < 6):
                    m.d.sync += r_head.word_select(r_idx[:3], 8).eq(byte)
                # the words from payload byte 4 on: word (idx - 4) // 4 at its last byte
                m.d.comb += [buf_w.en.eq((r_idx >= 4) & (r_idx[:2] == 3)),
                             buf_w.addr.eq(Cat(((r_idx >> 2) - 1)[:8], r_buf)),
                             buf_w.data.eq(Cat(r_word, byte))]
                with m.If(r_idx == r_len - 1):
                    m.next = "CRC"
            with on_byte("CRC", in_crc=False):
                # rx_crc holds the CRC of cmd .. payload: the field's bytes are not fed
                m.d.sync += [r_crc.eq(Cat(r_crc[8:], byte)), r_crc_idx.eq(r_crc_idx + 1)]
                with m.If(r_crc_idx == CRC_BYTES - 1):
                    m.next = "HUNT"
                    with m.If(Cat(r_crc, byte) == rx_crc.crc):
                        m.next = "PENDING"
            with m.State("PENDING"):
                # a good frame for the executor; bytes arriving before it is taken are
                # dropped (the third frame of the docstring)
                m.d.comb += [waiting.eq(1), pending.eq(1)]
                with m.If(x_idle):
                    m.d.sync += r_buf.eq(~r_buf)
                    m.next = "HUNT"
        handoff = pending & x_idle

        # --- checks of the frame handed over (host.protocol.serve's order) ----------------
        is_cmd = {c: r_cmd == c.value for c in Command}
        count = r_head[32:48]
        addr = r_head[:PORT_ADDR_BITS]
        region, first = addr[OFFSET_BITS:], addr[:OFFSET_BITS]
        # the range's last offset (one past the region when it runs out of it); the
        # count is checked by good_len first: 1..256. The sum and the address check are
        # each registered: the fields are final two CRC byte times before the handoff.
        last = Signal(OFFSET_BITS + 1)
        m.d.sync += last.eq(first + Mux(is_cmd[Command.WRITE], (r_len - 4) >> 2, count) - 1)
        good_addr = Signal()        # `firmware.protocol.address_ok`
        with m.Switch(region):
            for reg, w in windows(self._cfg).items():
                with m.Case(reg):
                    ok = last < w.limit
                    if w.gapped:        # a range must not cross a word's missing chunks
                        ok &= ((first >> w.chunk_bits) == (last >> w.chunk_bits)) & \
                              (last[:w.chunk_bits] < w.chunks)
                    if not w.writable:
                        ok &= ~is_cmd[Command.WRITE]
                    m.d.sync += good_addr.eq(ok)
            with m.Default():
                m.d.sync += good_addr.eq(0)
        good_len = Mux(is_cmd[Command.WRITE], (r_len >= 8) & (r_len[:2] == 0),
                   Mux(is_cmd[Command.READ], (r_len == 6) & (count >= 1) & (count <= MAX_WORDS),
                   Mux(is_cmd[Command.START], r_len == 2, r_len == 0)))
        # The checks and what the executor takes are registered: the frame's fields are
        # final from its first CRC byte on, and the handoff comes after its last (so
        # ``running`` is the one of the cycle before the handoff)
        err = Signal(3)             # an ErrorCode, 0 for none
        with m.If(~Cat(*is_cmd.values()).any()):
            m.d.sync += err.eq(ErrorCode.UNKNOWN_COMMAND)
        with m.Elif(~good_len):
            m.d.sync += err.eq(ErrorCode.BAD_LENGTH)
        with m.Elif((is_cmd[Command.WRITE] | is_cmd[Command.READ]) & ~good_addr):
            m.d.sync += err.eq(ErrorCode.BAD_ADDRESS)
        with m.Elif(self.running & is_cmd[Command.START]):
            m.d.sync += err.eq(ErrorCode.START_WHILE_RUNNING)
        # a good range lies inside one region: READ while running needs it to be REGS
        with m.Elif(self.running & (is_cmd[Command.WRITE] | is_cmd[Command.LOADED]
                                    | is_cmd[Command.READ] & (region != Region.REGS))):
            m.d.sync += err.eq(ErrorCode.RUNNING)
        with m.Elif(is_cmd[Command.START] & ~self.loaded):
            m.d.sync += err.eq(ErrorCode.NO_MODEL)
        with m.Else():
            m.d.sync += err.eq(0)

        # --- the frame as the executor holds it -------------------------------------------
        x_cmd, x_seq = Signal(8), Signal(8)
        x_err = Signal(3)             # an ErrorCode, 0 for none
        x_buf = Signal()
        x_addr = Signal(PORT_ADDR_BITS)
        x_count = Signal(range(MAX_WORDS + 1))      # words to read or write
        x_entry = Signal(16)
        x_reads = Signal()                          # IDENTIFY, STATUS, READ: words answer
        x_model = Signal()                          # a WRITE into MODEL_REGIONS
        x_rlen = Signal(16)
        x_starts = Signal()                         # the word being fetched is STARTS
        starts = Signal(32)                         # STARTs served since reset
        is_x = {c: x_cmd == c.value for c in Command}
        failed, x_failed = err != 0, x_err != 0
        words = Signal.like(x_count)
        first_addr = Signal.like(x_addr)
        answers = Signal()          # IDENTIFY, STATUS, READ
        model = Signal()
        m.d.sync += [
            words.eq(Mux(is_cmd[Command.IDENTIFY], len(IDENTIFY_REGS),
                     Mux(is_cmd[Command.STATUS], STATUS_WORDS,
                     Mux(is_cmd[Command.READ], count, (r_len - 4) >> 2)))),
            first_addr.eq(Mux(is_cmd[Command.IDENTIFY], _reg(IDENTIFY_REGS[0]),
                          Mux(is_cmd[Command.STATUS], _reg(STATUS_REGS[0]),
                          Mux(is_cmd[Command.START] | is_cmd[Command.ABORT], _reg(Regs.CONTROL),
                              addr)))),
            answers.eq(is_cmd[Command.IDENTIFY] | is_cmd[Command.STATUS] | is_cmd[Command.READ]),
            model.eq(Cat(region == r.value for r in MODEL_REGIONS).any()),
        ]
        reads = ~failed & answers
        with m.If(handoff):
            m.d.sync += [
                x_cmd.eq(r_cmd), x_seq.eq(r_seq), x_err.eq(err), x_buf.eq(r_buf),
                x_addr.eq(first_addr), x_count.eq(words), x_entry.eq(r_head[:16]),
                x_reads.eq(reads), x_model.eq(model),
                x_rlen.eq(Mux(failed, 2, Mux(reads, words << 2, 0))),
            ]

        # --- executor and transmitter -----------------------------------------------------
        tx = self.tx
        sent = tx.valid & tx.ready
        m.d.comb += tx_crc.data.eq(tx.payload)
        h_idx = Signal(range(5))          # header byte
        c_idx = Signal(2)                 # CRC byte
        shift = Signal(32)                # the payload word (or error bytes) being sent
        left = Signal(range(5))           # its bytes still to send
        w_idx = Signal(range(MAX_WORDS + 2))
        w_valid = Signal()                # the buffer word read last cycle is to be written

        with m.FSM(name="executor"):
            with m.State("IDLE"):
                m.d.comb += [x_idle.eq(1), tx_crc.start.eq(1)]
                m.d.sync += [h_idx.eq(0), c_idx.eq(0), w_idx.eq(0), w_valid.eq(0)]
                with m.If(handoff):
                    m.next = "EXEC"
            with m.State("EXEC"):
                m.next = "HEADER"
                with m.If(~x_failed):
                    with m.If(is_x[Command.WRITE]):
                        m.next = "WRITE"
                        # the flag falls before the first word is written: a load cut
                        # short after any of its words leaves no model
                        with m.If(x_model):
                            m.d.sync += self.loaded.eq(0)
                    with m.If(is_x[Command.LOADED]):
                        m.d.sync += self.loaded.eq(1)
                    with m.If(is_x[Command.START]):
                        m.d.sync += starts.eq(starts + 1)
                    with m.If(is_x[Command.START] | is_x[Command.ABORT]):
                        m.d.comb += [self.we.eq(1), self.addr.eq(x_addr),
                                     self.wdata.eq(Mux(is_x[Command.START],
                                                       Control.START.value | (x_entry << 16),
                                                       Control.ABORT.value))]
            with m.State("WRITE"):
                # the buffer's read port gives word i the cycle after its address: the
                # port writes word i while word i + 1 is read, one word per cycle
                m.d.comb += [buf_r.addr.eq(Cat(w_idx[:8], x_buf)),
                             self.we.eq(w_valid), self.addr.eq(x_addr), self.wdata.eq(buf_r.data)]
                m.d.sync += [w_idx.eq(w_idx + 1), w_valid.eq(w_idx < x_count)]
                with m.If(w_valid):
                    m.d.sync += x_addr.eq(x_addr + 1)
                    with m.If(w_idx == x_count):
                        m.next = "HEADER"
            with m.State("HEADER"):
                header = Array([Const(SYNC, 8), Mux(x_failed, ERROR_CMD, x_cmd | RESPONSE),
                                x_seq, x_rlen[:8], x_rlen[8:]])
                m.d.comb += [tx.valid.eq(1), tx.payload.eq(header[h_idx]),
                             tx_crc.valid.eq(sent & (h_idx != 0))]
                with m.If(sent):
                    m.d.sync += h_idx.eq(h_idx + 1)
                    with m.If(h_idx == 4):
                        with m.If(x_failed):
                            m.d.sync += [shift.eq(Cat(x_cmd, x_err)), left.eq(2)]
                            m.next = "SEND"
                        with m.Elif(x_reads):
                            m.next = "FETCH"
                        with m.Else():
                            m.next = "CRC"
            with m.State("FETCH"):
                # STATUS's last word is the link's START count, not a port register
                last_status = is_x[Command.STATUS] & (x_count == 1)
                m.d.comb += [self.re.eq(~last_status), self.addr.eq(x_addr)]
                m.d.sync += x_starts.eq(last_status)
                # STATUS's eight registers skip CONTROL, the only gap among them
                m.d.sync += [x_addr.eq(x_addr + 1 + (is_x[Command.STATUS] & (x_addr == _reg(Regs.CONTROL - 1)))),
                             x_count.eq(x_count - 1)]
                m.next = "CAPTURE"
            with m.State("CAPTURE"):
                # the port answers when it can (the device's port registers: 2 cycles more)
                with m.If(x_starts | self.rvalid):
                    m.d.sync += [shift.eq(Mux(x_starts, starts, self.rdata)), left.eq(4)]
                    m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += [tx.valid.eq(1), tx.payload.eq(shift[:8]), tx_crc.valid.eq(sent)]
                with m.If(sent):
                    m.d.sync += [shift.eq(shift >> 8), left.eq(left - 1)]
                    with m.If(left == 1):
                        m.next = "CRC"
                        with m.If(x_reads & (x_count != 0)):
                            m.next = "FETCH"
            with m.State("CRC"):
                m.d.comb += [tx.valid.eq(1), tx.payload.eq(tx_crc.crc.word_select(c_idx, 8))]
                with m.If(sent):
                    m.d.sync += c_idx.eq(c_idx + 1)
                    with m.If(c_idx == CRC_BYTES - 1):
                        m.next = "IDLE"
        return m
