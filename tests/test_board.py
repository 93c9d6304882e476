"""The simulated board (sim.board): a Verilated top level bridged to a pseudo-terminal.

A loopback design (rx through two flops to tx) checks the harness itself: 8N1 both ways
at divisor 4, close, hang-up, the idle sleep and the build cache. The real device
(`gateware.device.Device`) answers IDENTIFY when it exists.
"""

import os
import random
import struct
import time

import pytest

from gateware.config import DEFAULT
from sim import board as sim_board

serial = pytest.importorskip("serial")

pytestmark = pytest.mark.skipif(sim_board.missing_reason() is not None,
                                reason=str(sim_board.missing_reason()))


def loopback():
    from amaranth import Module, Signal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    class Loopback(wiring.Component):
        """rx through a two-flop synchronizer to tx; never running."""
        rx: In(1)
        tx: Out(1, init=1)
        running: Out(1)

        def elaborate(self, platform):
            m = Module()
            meta = Signal(init=1)
            m.d.sync += [meta.eq(self.rx), self.tx.eq(meta)]
            return m

    return Loopback()


@pytest.fixture(scope="module")
def loopback_exe():
    return sim_board.build(DEFAULT, loopback(), divisor=4)


def read_exactly(port, n, timeout=20):
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < n and time.monotonic() < deadline:
        data += port.read(n - len(data))
    return data


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_loopback_echoes_random_bytes(loopback_exe):
    data = random.Random(1).randbytes(1000)
    with sim_board.launch(DEFAULT, loopback(), divisor=4) as board:
        assert board.path.startswith("/dev/")
        with serial.Serial(board.path, baudrate=115200, timeout=1) as port:
            port.write(data)
            assert read_exactly(port, len(data)) == data
        board.process.wait(timeout=10)     # the pty's user hung up: the board exits
    assert board.process.returncode == 0
    assert board.stats["cycles"] >= 1000 * 10 * 4
    print(f"loopback: {board.stats['cycles_per_second']:,.0f} cycles/s")


def test_close_terminates(loopback_exe):
    board = sim_board.launch(DEFAULT, loopback(), divisor=4)
    assert os.path.exists(board.path)
    assert board.process.poll() is None
    assert board.close() == 0
    assert board.process.poll() is not None
    assert board.stats is not None
    assert board.close() == 0                       # closing twice is harmless


def test_idle_board_sleeps(loopback_exe):
    with sim_board.launch(DEFAULT, loopback(), divisor=4) as board:
        with serial.Serial(board.path, timeout=1) as port:
            port.write(b"x")
            assert read_exactly(port, 1) == b"x"
            time.sleep(0.3)
            before = cpu_seconds(board.process.pid)
            time.sleep(1.0)
            used = cpu_seconds(board.process.pid) - before
            assert used < 0.3, f"an idle board used {used:.2f} s of CPU in 1 s"
            port.write(b"yz")                       # and wakes up for the next bytes
            assert read_exactly(port, 2) == b"yz"


def test_orphaned_board_exits(loopback_exe):
    # --parent names a process that is not its parent: as if the host had died.
    board = sim_board.Board(loopback_exe, ["--parent", "1"])
    try:
        assert board.process.wait(timeout=10) == 0
    finally:
        board.close()


def test_build_is_cached(loopback_exe):
    start = time.monotonic()
    again = sim_board.build(DEFAULT, loopback(), divisor=4)
    assert again == loopback_exe
    assert time.monotonic() - start < 10
    other = sim_board.build(DEFAULT, loopback(), divisor=5)
    assert other != loopback_exe


def test_missing_tools_raise(monkeypatch):
    monkeypatch.setattr(sim_board, "missing_reason", lambda: "no g++ here")
    with pytest.raises(sim_board.BoardError, match=r"^no g\+\+ here$"):
        sim_board.launch(DEFAULT)
    assert issubclass(sim_board.BoardError, RuntimeError)


def crc32(data):
    """CRC-32 of IEEE 802.3, bit by bit (the frames' CRC, docs/protocol.md)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32_check_value():
    assert crc32(b"123456789") == 0xCBF43926


def device_missing():
    try:
        import gateware.device  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import means no device yet
        return f"gateware.device is not importable: {exc}"
    return None


@pytest.mark.skipif(device_missing() is not None, reason=str(device_missing()))
def test_device_identify():
    seq = 0x37
    body = bytes([0x01, seq, 0x00, 0x00])
    frame = bytes([0xA5]) + body + struct.pack("<I", crc32(body))
    with sim_board.launch(DEFAULT, divisor=4) as board:
        with serial.Serial(board.path, timeout=1) as port:
            port.write(frame)
            head = read_exactly(port, 5, timeout=60)
            assert head[:3] == bytes([0xA5, 0x81, seq]), head.hex()
            n = head[3] | head[4] << 8
            rest = read_exactly(port, n + 4, timeout=60)
            assert len(rest) == n + 4
            payload = rest[:n]
            assert crc32(head[1:] + payload) == int.from_bytes(rest[-4:], "little")
            assert n == 12
            ident, config_hash, _geometry = struct.unpack("<3I", payload)
            assert ident == 0x534B5431
            assert config_hash == DEFAULT.hash
    print(f"device: {board.stats['cycles_per_second']:,.0f} cycles/s")


@pytest.mark.skipif(device_missing() is not None, reason=str(device_missing()))
def test_serial_port_takes_the_reported_configuration():
    """The simulated board's pseudo-terminal opened as the serial device: without a board
    name the host takes the known configuration the device reports (DEFAULT here, though
    it was opened with the 45F's); named as another board, it is refused in one line."""
    from gateware.config import BOARDS
    from host.device import DeviceError, open_device
    with sim_board.launch(DEFAULT, divisor=4) as board:
        dev = open_device("serial", BOARDS["ulx3s-45f"], path=board.path)
        try:
            assert dev.cfg == DEFAULT
        finally:
            dev.close()
        with pytest.raises(DeviceError, match=f"device configuration {DEFAULT.hash:08x}, host expects "
                                              f"{BOARDS['ulx3s-45f'].hash:08x} \\(ulx3s-45f\\)"):
            open_device("serial", BOARDS["ulx3s-45f"], path=board.path, board="ulx3s-45f")
