"""The host link's UART protocol (docs/protocol.md): frames, CRC, requests, responses,
and the device's side as a pure function of a host port.

    0xA5 | cmd | seq | len_lo | len_hi | payload | crc (4 bytes, little-endian)

- `crc32` is CRC-32 (IEEE 802.3: zlib.crc32) over ``cmd .. payload``; `encode_frame` builds a frame,
  `FrameParser` finds frames in a byte stream (hunting for 0xA5, dropping frames with a
  bad CRC or a length above `MAX_PAYLOAD`, and counting what it dropped); the host's
  rescans a dropped frame's bytes, the device's (``rescan=False``) never does.
- `identify`, `write`, `read`, `start`, `status`, `abort`, `loaded` build requests;
  `response_payload` checks a response against its request (an error response raises
  `ProtocolError` with its `ErrorCode` and a one-line message, `ERROR_TEXT`) and `parse_identify`, `parse_read`,
  `parse_status` decode the payloads.
- `serve(frame, port)` is the device: it answers one request frame from a host port
  (``read(address)``, ``write(address, word)``, ``running``, ``cfg``, and the link's model
  flag ``loaded``, which it keeps) with the response bytes, or None for a frame the
  device drops. The `model` device serves exactly these bytes; the
  gateware (`gateware/link.py`) serves the same.
"""

import dataclasses
import struct
import zlib

from firmware.memmap import OFFSET_BITS, PORT_ADDR_BITS, Control, Region, Regs
from firmware.protocol import (CRC_BYTES, ERROR_CMD, HEADER_BYTES, IDENTIFY_REGS, MAX_PAYLOAD, MAX_WORDS,
                               MODEL_REGIONS, OVERHEAD_BYTES, RESPONSE, STATUS_REGS, STATUS_WORDS,
                               SYNC,
                               WATCHDOG_BYTES, Command, ErrorCode, address_ok)

__all__ = ["SYNC", "MAX_PAYLOAD", "MAX_WORDS", "WATCHDOG_BYTES", "HEADER_BYTES", "OVERHEAD_BYTES",
           "Command", "ERROR_CMD", "RESPONSE", "ErrorCode", "ERROR_TEXT", "ProtocolError", "LinkError",
           "Frame",
           "CRC_BYTES", "crc32", "encode_frame", "decode_frame", "FrameParser",
           "identify", "write", "read", "start", "status", "abort", "loaded", "error_response",
           "MODEL_REGIONS",
           "response_payload", "parse_identify", "parse_read", "parse_status", "Identity",
           "StatusWords", "STATUS_REGS", "STATUS_WORDS", "IDENTIFY_REGS", "serve"]

_ADDR_MASK = (1 << PORT_ADDR_BITS) - 1
_WORD_MASK = 0xFFFFFFFF


class LinkError(Exception):
    """The link misbehaved: no response in time, or one that does not answer the request."""


# What each error response means, for the one-line message a user sees
# ("<device>: device refused START: no model is loaded: ... (NO_MODEL, 6)").
ERROR_TEXT = {
    ErrorCode.UNKNOWN_COMMAND: "unknown command (the host and the device's bitstream speak "
                               "different versions of the protocol)",
    ErrorCode.BAD_LENGTH: "bad length for the command, or a word count outside 1..256",
    ErrorCode.RUNNING: "a program is running; only IDENTIFY, STATUS, ABORT and READs of the "
                       "registers are served until it stops",
    ErrorCode.START_WHILE_RUNNING: "a program is already running",
    ErrorCode.BAD_ADDRESS: "the address range leaves its region's memory, or the region is "
                           "read only",
    ErrorCode.NO_MODEL: "no model is loaded: the frozen network's weights and biases must be "
                        "written whole, then LOADED, before a program runs",
}
assert set(ERROR_TEXT) == set(ErrorCode)


class ProtocolError(LinkError):
    """The device answered with an error response: ``cmd``, ``code`` (int), ``code_name``;
    its message is one line saying what the code means."""

    def __init__(self, cmd, code):
        self.cmd, self.code = cmd, code
        try:
            self.code_name = ErrorCode(code).name
            text = ERROR_TEXT[ErrorCode(code)]
        except ValueError:
            self.code_name = f"error {code}"
            text = "an error code this host does not know (a newer bitstream?)"
        try:
            cmd_name = Command(cmd).name
        except ValueError:
            cmd_name = f"command 0x{cmd:02x}"
        super().__init__(f"device refused {cmd_name}: {text} ({self.code_name}, {code})")


@dataclasses.dataclass(frozen=True)
class Frame:
    cmd: int
    seq: int
    payload: bytes = b""

    def encode(self):
        return encode_frame(self.cmd, self.seq, self.payload)


def crc32(data):
    """CRC-32 of IEEE 802.3 (zlib's): polynomial 0x04C11DB7 reflected, initial and final
    xor 0xFFFFFFFF."""
    return zlib.crc32(bytes(data))


def _crc_at(buf, i):
    """The CRC field at ``buf[i:i + CRC_BYTES]``."""
    return int.from_bytes(buf[i:i + CRC_BYTES], "little")


def encode_frame(cmd, seq, payload=b""):
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes; at most {MAX_PAYLOAD}")
    body = struct.pack("<BBH", cmd & 0xFF, seq & 0xFF, len(payload)) + payload
    return bytes([SYNC]) + body + struct.pack("<I", crc32(body))


def decode_frame(data):
    """The Frame of exactly one whole frame's bytes, or None if they are not one (no sync,
    wrong length, oversize, bad CRC)."""
    data = bytes(data)
    if len(data) < OVERHEAD_BYTES or data[0] != SYNC:
        return None
    n = data[3] | data[4] << 8
    if n > MAX_PAYLOAD or len(data) != OVERHEAD_BYTES + n:
        return None
    if crc32(data[1:HEADER_BYTES + n]) != _crc_at(data, HEADER_BYTES + n):
        return None
    return Frame(data[1], data[2], data[HEADER_BYTES:HEADER_BYTES + n])


class FrameParser:
    """Frames out of a byte stream. `feed` returns the frames its bytes completed, in
    order. Bytes before a 0xA5 are skipped (counted in ``skipped``); a header with a
    length above MAX_PAYLOAD (``oversize``) or a frame with a bad CRC (``bad_crc``) is
    dropped, and so is a partial frame when the watchdog fires (`expire`, ``expired``).

    With ``rescan`` (the host's mode) the hunt goes on from the byte after a dropped
    frame's 0xA5, so a false start inside garbage cannot swallow the frame after it.
    Without it (the device's mode: gateware/link.py's receiver) a dropped frame's bytes
    are never looked at again: the hunt goes on after the CRC's last byte, after the
    length's bytes, or (the watchdog) with the next byte to arrive."""

    def __init__(self, rescan=True):
        self.rescan = rescan
        self._buf = bytearray()
        self.frames = self.skipped = self.oversize = self.bad_crc = self.expired = 0

    @property
    def dropped(self):
        return self.oversize + self.bad_crc + self.expired

    @property
    def pending(self):
        """Bytes held for a frame not yet complete."""
        return len(self._buf)

    def feed(self, data):
        self._buf += data
        return self._parse()

    def expire(self):
        """The watchdog fired: drop the partial frame (if any); returns the frames a
        rescan finds in the bytes after its 0xA5 (none in the device's mode)."""
        if not self._buf:
            return []
        self.expired += 1
        self._drop(len(self._buf))
        return self._parse()

    def _drop(self, n):
        """Drop the frame at the buffer's start: its 0xA5 alone for a rescan, else the
        ``n`` bytes the device had read when it gave up on it."""
        del self._buf[:1 if self.rescan else n]

    def _parse(self):
        buf, out = self._buf, []
        while True:
            i = buf.find(SYNC)
            if i < 0:
                self.skipped += len(buf)
                buf.clear()
                return out
            if i:
                self.skipped += i
                del buf[:i]
            if len(buf) < HEADER_BYTES:
                return out
            n = buf[3] | buf[4] << 8
            if n > MAX_PAYLOAD:
                self.oversize += 1
                self._drop(HEADER_BYTES)
                continue
            if len(buf) < OVERHEAD_BYTES + n:
                return out
            end = HEADER_BYTES + n
            if crc32(buf[1:end]) != _crc_at(buf, end):
                self.bad_crc += 1
                self._drop(end + CRC_BYTES)
                continue
            out.append(Frame(buf[1], buf[2], bytes(buf[HEADER_BYTES:end])))
            self.frames += 1
            del buf[:end + CRC_BYTES]


# ---------------------------------------------------------------- requests ----------

def _words(words):
    return struct.pack(f"<{len(words)}I", *(int(w) & _WORD_MASK for w in words))


def identify(seq):
    return encode_frame(Command.IDENTIFY, seq)


def write(seq, address, words):
    """WRITE ``words`` (1..256) at port addresses ``address`` up."""
    if not 1 <= len(words) <= MAX_WORDS:
        raise ValueError(f"a WRITE carries 1..{MAX_WORDS} words, not {len(words)}")
    return encode_frame(Command.WRITE, seq, _words([address]) + _words(words))


def read(seq, address, count):
    """READ ``count`` (1..256) words from port address ``address`` up."""
    if not 1 <= count <= MAX_WORDS:
        raise ValueError(f"a READ asks for 1..{MAX_WORDS} words, not {count}")
    return encode_frame(Command.READ, seq, struct.pack("<IH", address & _WORD_MASK, count))


def start(seq, entry=0):
    return encode_frame(Command.START, seq, struct.pack("<H", entry))


def status(seq):
    return encode_frame(Command.STATUS, seq)


def abort(seq):
    return encode_frame(Command.ABORT, seq)


def loaded(seq):
    """LOADED: the frozen model is written whole; sets the device's model flag."""
    return encode_frame(Command.LOADED, seq)


def error_response(seq, cmd, code):
    return encode_frame(ERROR_CMD, seq, bytes([cmd & 0xFF, int(code)]))


# ---------------------------------------------------------------- responses ---------

@dataclasses.dataclass(frozen=True)
class Identity:
    id: int
    config_hash: int
    geometry: int


@dataclasses.dataclass(frozen=True)
class StatusWords:
    status: int
    pc: int
    index: int
    updates: int
    cycles: int
    cycles_frozen: int
    cycles_cached: int
    cycles_infer: int
    starts: int             # STARTs the link served since reset (not a port register)


def _expect_len(frame, n):
    if len(frame.payload) != n:
        raise LinkError(f"a {Command(frame.cmd & ~RESPONSE).name} response of {len(frame.payload)} "
                        f"bytes; expected {n}")


def response_payload(frame, cmd, seq):
    """The payload of ``frame`` as the response to request ``cmd`` with ``seq``; raises
    ProtocolError for an error response, LinkError for a frame that does not answer it."""
    if frame.seq != seq & 0xFF:
        raise LinkError(f"response seq {frame.seq}, request seq {seq & 0xFF}")
    if frame.cmd == ERROR_CMD:
        if len(frame.payload) != 2 or frame.payload[0] != cmd:
            raise LinkError(f"malformed error response {frame.payload.hex()} to command 0x{cmd:02x}")
        raise ProtocolError(cmd, frame.payload[1])
    if frame.cmd != cmd | RESPONSE:
        raise LinkError(f"response cmd 0x{frame.cmd:02x} to command 0x{cmd:02x}")
    n = {Command.IDENTIFY: 4 * len(IDENTIFY_REGS), Command.STATUS: 4 * STATUS_WORDS}.get(cmd)
    if n is not None or cmd in (Command.WRITE, Command.START, Command.ABORT, Command.LOADED):
        _expect_len(frame, n or 0)
    return frame.payload


def _unpack_words(payload):
    return list(struct.unpack(f"<{len(payload) // 4}I", payload))


def parse_identify(payload):
    return Identity(*_unpack_words(payload))


def parse_read(payload, count):
    if len(payload) != 4 * count:
        raise LinkError(f"a READ response of {len(payload)} bytes; expected {4 * count}")
    return _unpack_words(payload)


def parse_status(payload):
    return StatusWords(*_unpack_words(payload))


# ---------------------------------------------------------------- the device --------

def _reg(reg):
    return Region.REGS.value << OFFSET_BITS | reg


def serve(frame, port):
    """The device's response bytes to one request (a Frame, or a whole frame's bytes), or
    None when the device drops it (bytes that are not a valid frame). ``port`` is the
    host port: ``read(address)``, ``write(address, word)``, ``running`` and ``cfg`` (the
    AccelConfig whose address map it serves), and carries the
    link's model flag ``loaded`` (False at reset), which serve sets on LOADED and clears
    on every WRITE it serves to a region of MODEL_REGIONS, and its count ``starts`` (0 at
    reset) of the STARTs served, which STATUS answers after STATUS_REGS.

    Checks, in order: an unknown command (error 1), a bad length (error 2), a WRITE or
    READ reaching outside one region's memory (error 5, `firmware.protocol.address_ok`),
    then the running restrictions (START: error 4; WRITE, LOADED, READ outside REGS:
    error 3), then START without the model flag (error 6). A refused request touches
    nothing. Addresses are taken modulo 2**PORT_ADDR_BITS."""
    if not isinstance(frame, Frame):
        frame = decode_frame(frame)
        if frame is None:
            return None
    cmd, seq, p = frame.cmd, frame.seq, frame.payload
    try:
        cmd = Command(cmd)
    except ValueError:
        return error_response(seq, cmd, ErrorCode.UNKNOWN_COMMAND)

    def ok(words=()):
        return encode_frame(cmd | RESPONSE, seq, _words(list(words)))

    def fail(code):
        return error_response(seq, cmd, code)

    n = len(p)
    if cmd is Command.WRITE:
        good = n >= 8 and n % 4 == 0 and (n - 4) // 4 <= MAX_WORDS
    elif cmd is Command.READ:
        good = n == 6 and 1 <= (p[4] | p[5] << 8) <= MAX_WORDS
    elif cmd is Command.START:
        good = n == 2
    else:
        good = n == 0
    if not good:
        return fail(ErrorCode.BAD_LENGTH)

    running = bool(port.running)
    if cmd is Command.IDENTIFY:
        return ok(port.read(_reg(r)) for r in IDENTIFY_REGS)
    if cmd is Command.STATUS:
        return ok([port.read(_reg(r)) for r in STATUS_REGS] + [port.starts])
    if cmd is Command.ABORT:
        port.write(_reg(Regs.CONTROL), Control.ABORT)
        return ok()
    if cmd is Command.LOADED:
        if running:
            return fail(ErrorCode.RUNNING)
        port.loaded = True
        return ok()
    if cmd is Command.START:
        if running:
            return fail(ErrorCode.START_WHILE_RUNNING)
        if not port.loaded:
            return fail(ErrorCode.NO_MODEL)
        port.write(_reg(Regs.CONTROL), Control.START | (p[0] | p[1] << 8) << 16)
        port.starts = (port.starts + 1) & _WORD_MASK
        return ok()
    address = struct.unpack_from("<I", p)[0] & _ADDR_MASK
    count = p[4] | p[5] << 8 if cmd is Command.READ else (n - 4) // 4
    if not address_ok(address, count, cmd is Command.WRITE, port.cfg):
        return fail(ErrorCode.BAD_ADDRESS)
    # a good range lies inside one region
    if running and (cmd is Command.WRITE or address >> OFFSET_BITS != Region.REGS.value):
        return fail(ErrorCode.RUNNING)
    if cmd is Command.READ:
        return ok(port.read(address + i) for i in range(count))
    if address >> OFFSET_BITS in (r.value for r in MODEL_REGIONS):
        port.loaded = False         # a model being (re)written is not a model until LOADED
    for i, w in enumerate(_unpack_words(p[4:])):
        port.write(address + i, w)
    return ok()
