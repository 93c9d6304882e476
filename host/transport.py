"""Byte pipes to a device: ``write(data)`` sends bytes, ``read(n, timeout)`` returns at
most ``n`` bytes (those that arrived, waiting up to ``timeout`` seconds for the first; b""
if none), ``close()``.

- `SerialTransport(path, baud)`: a UART through pyserial (a board, or the simulated
  board's pseudo-terminal).
- `ModelTransport(cfg)`: the instruction-level model (`sim.machine.Machine`) behind
  `host.protocol.serve`; a START runs the program to completion inside the Machine, so
  the next STATUS reports it done.
- `RtlTransport(cfg, faults, seed)`: the simulated board (`sim.board.launch(cfg)`: the
  gateware in a simulator behind a pseudo-terminal), through a SerialTransport;
  ``faults`` > 0 makes its link drop, corrupt, duplicate and cut bytes at that rate per
  byte (``board.stats["faults"]`` after close).
"""

import re
import time

from gateware.config import DEFAULT

from .protocol import FrameParser, serve

__all__ = ["DeviceError", "SerialTransport", "ModelTransport", "RtlTransport"]


class DeviceError(Exception):
    """A problem with a device or a file it reads (one-line message)."""


class SerialTransport:
    def __init__(self, path, baud=DEFAULT.baud):
        import serial
        try:
            self._port = serial.Serial(path, baud, timeout=0)
        except (serial.SerialException, OSError, ValueError) as e:
            reason = re.sub(r"^.*\[Errno \d+\] ", "", str(e))
            raise DeviceError(f"cannot open serial port {path}: {reason}") from None
        self.path = path
        self._port.reset_input_buffer()

    def write(self, data):
        self._port.write(data)
        self._port.flush()

    def read(self, n, timeout):
        self._port.timeout = timeout
        first = self._port.read(1)
        if not first or n <= 1:
            return first
        more = min(n - 1, self._port.in_waiting)
        return first + (self._port.read(more) if more else b"")

    def close(self):
        self._port.close()


class ModelTransport:
    """The golden model answering frames exactly as the gateware's link does."""

    def __init__(self, cfg=DEFAULT):
        from sim.machine import Machine
        self.machine = Machine(cfg)
        self._parser = FrameParser(rescan=False)
        self._out = bytearray()

    def write(self, data):
        self._serve(self._parser.feed(data))

    def _serve(self, frames):
        for frame in frames:
            response = serve(frame, self.machine)
            if response is not None:
                self._out += response

    def read(self, n, timeout):
        if not self._out and timeout:
            # nothing will come: a dropped frame waits out the timeout, as on a board, and
            # the watchdog clears a partial one (serving nothing: the device does not rescan)
            time.sleep(min(timeout, 0.01))
            self._serve(self._parser.expire())
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    def close(self):
        pass


class RtlTransport:
    """The gateware in a simulator, behind a pseudo-terminal (`sim.board`)."""

    def __init__(self, cfg=DEFAULT, faults=0.0, seed=0):
        try:
            from sim import board
        except ModuleNotFoundError as e:
            if e.name not in ("sim.board", "sim"):
                raise
            raise DeviceError("the simulated board (sim.board) is not available yet") from None
        try:
            self.board = board.launch(cfg, faults=faults, seed=seed)
        except (getattr(board, "BoardError", OSError), OSError, ValueError) as e:
            raise DeviceError(f"rtl: {e}") from None
        try:
            self._serial = SerialTransport(self.board.path, cfg.baud)
        except DeviceError:
            self.board.close()
            raise

    def write(self, data):
        self._serial.write(data)

    def read(self, n, timeout):
        return self._serial.read(n, timeout)

    def close(self):
        try:
            self._serial.close()
        finally:
            self.board.close()
