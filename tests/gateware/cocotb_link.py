"""cocotb tests of the whole device at its pins (gateware/device.py, UART divisor
SKIPTUNE_LINK_DIVISOR): a UART driver on rx and a monitor on tx, one Python step per
bit, and host/protocol.py to build requests and parse responses.

Inputs are driven on falling edges."""

import random

import cocotb
from cocotb.triggers import FallingEdge, Timer
from cocotb.utils import get_sim_time

from firmware.memmap import ID_MAGIC, Region, Regs, Status, address
from host import protocol as hp
from tests.gateware.streams import config_from_env, env_int, report_json, start

CFG = config_from_env()
DIVISOR = env_int("SKIPTUNE_LINK_DIVISOR", 4)
CLOCK_NS = 10
BIT_NS = DIVISOR * CLOCK_NS
BYTE_NS = 10 * BIT_NS
WATCHDOG_NS = hp.WATCHDOG_BYTES * BYTE_NS
LATENCY = 7


class Uart:
    """The host's end of the device's UART."""

    def __init__(self, dut):
        self.dut = dut
        self.got = bytearray()
        self.parser = hp.FrameParser()
        self.frames = []
        self.first_start_ns = []        # when each response's first start bit fell
        self.last_stop_ns = 0           # when the last request byte's stop bit began
        dut.rx.value = 1
        cocotb.start_soon(self._monitor())

    async def send(self, data):
        """Send ``data`` back to back; returns at a falling edge after the last stop bit."""
        dut = self.dut
        for b in data:
            for bit in [0] + [(b >> i) & 1 for i in range(8)]:
                dut.rx.value = bit
                await Timer(BIT_NS, unit="ns")
            self.last_stop_ns = get_sim_time("ns")
            dut.rx.value = 1
            await Timer(BIT_NS, unit="ns")

    async def _monitor(self):
        tx = self.dut.tx
        while True:
            await FallingEdge(tx)
            t0 = get_sim_time("ns")
            await Timer(BIT_NS // 2, unit="ns")
            byte = 0
            for i in range(8):
                await Timer(BIT_NS, unit="ns")
                byte |= int(tx.value) << i
            await Timer(BIT_NS, unit="ns")
            assert int(tx.value) == 1, "response byte with a bad stop bit"
            if self.parser.pending == 0 and byte == hp.SYNC:
                self.first_start_ns.append(t0)
            self.got.append(byte)
            self.frames += self.parser.feed(bytes([byte]))

    async def responses(self, n, timeout_bytes=2000):
        """Wait until ``n`` response frames have come in all; returns them all."""
        for _ in range(timeout_bytes):
            if len(self.frames) >= n:
                return self.frames
            await Timer(BYTE_NS, unit="ns")
        raise AssertionError(f"{len(self.frames)} of {n} responses after {timeout_bytes} byte times")

    async def request(self, frame, cmd):
        """Send one request, return its response's payload (ProtocolError for an error)."""
        n = len(self.frames)
        await self.send(frame)
        resp = (await self.responses(n + 1))[n]
        return hp.response_payload(resp, cmd, frame[2])

    async def quiet(self, byte_times):
        """Wait ``byte_times`` and check that no response came."""
        n = len(self.got)
        await Timer(byte_times * BYTE_NS, unit="ns")
        assert len(self.got) == n, f"unexpected response bytes {self.got[n:].hex()}"

    async def read(self, addr, count, seq=0x40):
        return hp.parse_read(await self.request(hp.read(seq, addr, count), hp.Command.READ), count)

    async def write(self, addr, words, seq=0x41):
        await self.request(hp.write(seq, addr, words), hp.Command.WRITE)


async def setup(dut):
    dut.rx.value = 1
    await start(dut)
    return Uart(dut)


def prog(word):
    return address(Region.PROGRAM, word, CFG)


def adapters(word):
    return address(Region.ADAPTERS, word, CFG)


@cocotb.test()
async def identify(dut):
    uart = await setup(dut)
    ident = hp.parse_identify(await uart.request(hp.identify(7), hp.Command.IDENTIFY))
    assert ident.id == ID_MAGIC and ident.config_hash == CFG.hash
    assert ident.geometry & 0xFF == CFG.array_rows
    # from the middle of the request's last stop bit to the response's start bit: 7
    # cycles from the clock edge that first sees the middle, which comes half a cycle
    # after the falling edge the pin is driven on (gateware/device.py)
    latency = (uart.first_start_ns[0] - uart.last_stop_ns - BIT_NS // 2) / CLOCK_NS
    dut._log.info(f"latency from the last stop bit's middle: {latency} cycles")
    assert latency == LATENCY - 0.5


@cocotb.test()
async def write_read_round_trip(dut):
    uart = await setup(dut)
    rng = random.Random(1)
    for base in (prog(5), adapters(300)):
        words = [rng.randrange(1 << 32) for _ in range(40)]
        await uart.write(base, words)
        assert await uart.read(base, len(words)) == words
        assert await uart.read(base + 3, 2) == words[3:5]
    status = hp.parse_status(await uart.request(hp.status(9), hp.Command.STATUS))
    assert status.status == 0 and status.cycles == 0


@cocotb.test()
async def back_to_back(dut):
    """Two requests with no gap on the line: both answered, in order."""
    uart = await setup(dut)
    a, b = hp.write(1, prog(20), [11, 22, 33]), hp.read(2, prog(20), 3)
    await uart.send(a + b)
    first, second = await uart.responses(2)
    assert hp.response_payload(first, hp.Command.WRITE, 1) == b""
    assert hp.parse_read(hp.response_payload(second, hp.Command.READ, 2), 3) == [11, 22, 33]


@cocotb.test()
async def cut_frame_then_good(dut):
    """A frame cut in the middle, silence past the watchdog, then a good frame: the good
    one is answered, the cut one wrote nothing."""
    uart = await setup(dut)
    await uart.write(prog(40), [1, 2, 3, 4])
    cut = hp.write(3, prog(40), [9, 9, 9, 9])
    await uart.send(cut[:12])
    await Timer(WATCHDOG_NS + 2 * BYTE_NS, unit="ns")
    assert len(uart.frames) == 1
    assert await uart.read(prog(40), 4) == [1, 2, 3, 4]


@cocotb.test()
async def flipped_bit_dropped(dut):
    uart = await setup(dut)
    await uart.write(adapters(7), [0x1234])
    bad = bytearray(hp.write(4, adapters(7), [0x5678]))
    bad[10] ^= 0x04
    await uart.send(bad)
    await uart.quiet(30)
    assert len(uart.frames) == 1
    assert await uart.read(adapters(7), 1) == [0x1234]


@cocotb.test()
async def error_responses(dut):
    uart = await setup(dut)
    cases = [(hp.encode_frame(0x2A, 5), 0x2A, hp.ErrorCode.UNKNOWN_COMMAND),
             (hp.encode_frame(hp.Command.WRITE, 6, bytes(6)), hp.Command.WRITE, hp.ErrorCode.BAD_LENGTH),
             (hp.encode_frame(hp.Command.READ, 7, bytes(6)), hp.Command.READ, hp.ErrorCode.BAD_LENGTH),
             (hp.encode_frame(hp.Command.STATUS, 8, b"\x01"), hp.Command.STATUS, hp.ErrorCode.BAD_LENGTH)]
    for frame, cmd, code in cases:
        try:
            await uart.request(frame, cmd)
        except hp.ProtocolError as e:
            assert e.cmd == cmd and e.code == code, e
        else:
            raise AssertionError(f"no error response to {frame.hex()}")


@cocotb.test()
async def status_words(dut):
    uart = await setup(dut)
    status = hp.parse_status(await uart.request(hp.status(3), hp.Command.STATUS))
    regs = await uart.read(address(Region.REGS, Regs.STATUS, CFG), 1)
    assert status.status == regs[0]
    assert len(await uart.request(hp.status(4), hp.Command.STATUS)) == 4 * hp.STATUS_WORDS == 36


@cocotb.test()
async def bad_address(dut):
    """WRITEs and READs outside a region's memory get BAD_ADDRESS and write nothing: a
    range past PROGRAM's end, an offset the memory would wrap onto word 904, a WRITE to
    RESULTS and to REGS, an undefined region."""
    uart = await setup(dut)
    words = CFG.program_words
    await uart.write(prog(0), [0x600D0000])
    await uart.write(prog(5000 % words), [0x600D0001])
    await uart.write(prog(words - 1), [0x600D0002])
    cases = [(hp.write(1, prog(words - 1), [0xBAD, 0xBAD]), hp.Command.WRITE),
             (hp.write(2, prog(5000), [0xBAD]), hp.Command.WRITE),
             (hp.write(3, address(Region.RESULTS, 0, CFG), [0xBAD]), hp.Command.WRITE),
             (hp.write(4, address(Region.REGS, Regs.CONTROL, CFG), [1]), hp.Command.WRITE),
             (hp.read(5, prog(words - 1), 2), hp.Command.READ),
             (hp.read(6, 0x0A000000, 1), hp.Command.READ)]
    for frame, cmd in cases:
        try:
            await uart.request(frame, cmd)
        except hp.ProtocolError as e:
            assert e.cmd == cmd and e.code == hp.ErrorCode.BAD_ADDRESS, e
        else:
            raise AssertionError(f"no error response to {frame.hex()}")
    assert await uart.read(prog(0), 1) == [0x600D0000]
    assert await uart.read(prog(5000 % words), 1) == [0x600D0001]
    assert await uart.read(prog(words - 1), 1) == [0x600D0002]
    status = hp.parse_status(await uart.request(hp.status(7), hp.Command.STATUS))
    assert status.status == 0


@cocotb.test()
async def start_needs_model(dut):
    """The model flag at the pins: START after reset, or after one chunk of WEIGHTS was
    written (a load cut short), gets NO_MODEL and leaves STATUS as it was; LOADED lets
    the program run (to HALT)."""
    from firmware.asm import assemble

    uart = await setup(dut)
    weights = address(Region.WEIGHTS, 0, CFG)

    async def refused(seq):
        before = await uart.request(hp.status(seq), hp.Command.STATUS)
        try:
            await uart.request(hp.start(seq, 0), hp.Command.START)
        except hp.ProtocolError as e:
            assert e.code == hp.ErrorCode.NO_MODEL, e
        else:
            raise AssertionError("START without a model was served")
        assert await uart.request(hp.status(seq), hp.Command.STATUS) == before

    await uart.write(prog(0), assemble("SETIDX 5\nINCIDX\nHALT"))
    await refused(1)
    await uart.request(hp.loaded(2), hp.Command.LOADED)
    await uart.request(hp.start(3, 0), hp.Command.START)
    status = hp.parse_status(await uart.request(hp.status(4), hp.Command.STATUS))
    assert status.status & Status.DONE and status.index == 6 and status.starts == 1
    await uart.write(weights, [0x01020304])
    await refused(5)
    assert hp.parse_status(await uart.request(hp.status(6), hp.Command.STATUS)) == status


def _pins_request(rng, seq):
    """A valid request for `corrupted_frames`: `tests.test_protocol.random_request` (WRITE
    bursts of at most 4 words, READs, IDENTIFY, STATUS, ABORT, LOADED) without START (a
    run would make the device's cycle counters, which the Machine does not model, differ)
    and without READs of WEIGHTS or BIASES (write only on the device; the Machine reads
    them back)."""
    from tests.test_protocol import random_request

    while True:
        req = random_request(rng, seq, CFG, max_words=4)
        frame = hp.decode_frame(req)
        if frame.cmd == hp.Command.START:
            continue
        if frame.cmd == hp.Command.READ and frame.payload[3] & 0xF in (Region.WEIGHTS.value,
                                                                       Region.BIASES.value):
            continue
        return req


@cocotb.test()
async def corrupted_frames(dut):
    """The issue's figure at the device's pins: SKIPTUNE_LINK_CORRUPT (100) seeded valid
    requests (SKIPTUNE_LINK_SEED), each first sent corrupted (`tests.test_protocol.corrupt`:
    1..3 flipped bits, a dropped, duplicated or inserted byte, a frame cut short; each one
    that serve's parser rejects), then, past the watchdog, intact. A corrupted frame gets
    no response byte at all and changes nothing: the range its intact WRITE would write
    (unless in WEIGHTS or BIASES, which the port cannot read back) reads as on a
    `sim.machine.Machine` that never saw it, and so does STATUS. The intact request's
    response (READs of the memories, IDENTIFY, LOADED, ...) is byte for byte
    `host.protocol.serve`'s on that Machine."""
    import time

    from sim.machine import Machine
    from tests.test_protocol import CORRUPTIONS, corrupt, flush

    n = env_int("SKIPTUNE_LINK_CORRUPT", 100)
    rng = random.Random(env_int("SKIPTUNE_LINK_SEED", 909))
    uart = await setup(dut)
    ref = Machine(CFG)
    t0 = time.monotonic()
    seq = 0
    per_kind = {kind: 0 for kind in CORRUPTIONS}
    read_backs = 0

    async def served(frame, k):
        """Send a valid request; check its response against serve's on ``ref``."""
        want = hp.serve(frame, ref)
        frames, start = len(uart.frames), len(uart.got)
        await uart.send(frame)
        await uart.responses(frames + 1)
        got = bytes(uart.got[start:])
        assert got == want, (k, frame.hex(), got.hex(), want.hex())

    for k in range(n):
        seq = (seq + 1) & 0xFF
        good = _pins_request(rng, seq)
        kind = CORRUPTIONS[k % len(CORRUPTIONS)]
        bad = corrupt(good, kind, rng)
        parser = hp.FrameParser()
        assert parser.feed(bad) + flush(parser) == [], (k, kind)       # serve drops it
        per_kind[kind] += 1
        got = len(uart.got)
        await uart.send(bad)
        await Timer(WATCHDOG_NS + 4 * BYTE_NS, unit="ns")
        assert len(uart.got) == got, (k, kind, bad.hex(), uart.got[got:].hex())
        # nothing changed: what the intact WRITE would write reads as on ref, and STATUS
        # (every 10th: START is not among the requests, so only a stray ABORT could show
        # there, and the time goes to the bytes at the pins)
        frame = hp.decode_frame(good)
        if k % 10 == 0:
            await served(hp.status(seq), k)
        a = int.from_bytes(frame.payload[:4], "little") & 0x0FFFFFFF
        if frame.cmd == hp.Command.WRITE and Region(a >> 24) not in (Region.WEIGHTS, Region.BIASES):
            await served(hp.read(seq, a, (len(frame.payload) - 4) // 4), k)
            read_backs += 1
        await served(good, k)
    seconds = time.monotonic() - t0
    # each step above asserts: here no corrupted frame was answered or changed what was read
    figures = {"tried": n, "answered": 0, "changed_state": 0, "read_backs": read_backs,
               "per_kind": per_kind, "seconds": round(seconds, 1)}
    dut._log.info(f"corrupted frames at the pins: {figures}")
    report_json("SKIPTUNE_LINK_REPORT", "corrupted_frames", figures)
