"""Loading a bitstream onto a board with openFPGALoader.

ULX3S: the FT231X on the USB port marked US1 is both the UART and the JTAG
(openFPGALoader's ``ulx3s`` board, cable ``ft231X``). ``--flash`` writes the SPI flash,
from which the FPGA configures itself at every power-up; otherwise the bitstream goes to
the FPGA's SRAM and is lost at power-off.
"""

import os
import shutil
import subprocess

from . import BoardError

__all__ = ["flash_bitstream", "loader_path"]

# openFPGALoader's board name for each of our boards
LOADER_BOARDS = {"ulx3s-12f": "ulx3s", "ulx3s-25f": "ulx3s", "ulx3s-45f": "ulx3s", "ulx3s-85f": "ulx3s"}


def loader_path():
    """openFPGALoader from $OPENFPGALOADER or PATH, or None."""
    return os.environ.get("OPENFPGALOADER") or shutil.which("openFPGALoader")


def flash_bitstream(board, bitstream=None, to_flash=False, root="build", timeout=600):
    """Load ``bitstream`` (default ``<root>/<board>/skiptune.bit``) onto ``board``; returns
    a one-line summary. Raises `BoardError` with the reason when the file, the loader or
    the board is missing or the load fails."""
    if board not in LOADER_BOARDS:
        raise BoardError(f"unknown board {board!r}: choose one of {', '.join(LOADER_BOARDS)}")
    path = bitstream or os.path.join(root, board, "skiptune.bit")
    if not os.path.isfile(path):
        hint = f"; build it with: skiptune build --board {board}" if bitstream is None else ""
        raise BoardError(f"no bitstream at {path}{hint}")
    loader = loader_path()
    if not loader:
        raise BoardError("openFPGALoader not found: install it (Debian/Ubuntu: apt install "
                         "openfpgaloader; or https://github.com/trabucayre/openFPGALoader) or set "
                         "OPENFPGALOADER to its path")
    command = [loader, "--board", LOADER_BOARDS[board], *(["--write-flash"] if to_flash else []), path]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        raise BoardError(f"cannot run {loader}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise BoardError(f"openFPGALoader did not finish in {timeout} s") from None
    if done.returncode != 0:
        text = (done.stderr + done.stdout).strip().splitlines()
        reason = next((ln for ln in text if "rror" in ln or "not found" in ln.lower()),
                      text[-1] if text else f"exit status {done.returncode}")
        raise BoardError(f"openFPGALoader could not load {path} (is the board plugged into "
                         f"its US1 port?): {reason.strip()}")
    where = "SPI flash" if to_flash else "SRAM"
    return f"skiptune flash: {path} loaded into the {board}'s {where}"
