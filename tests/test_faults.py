"""An unreliable link: the host retries every request whose response is missing, corrupt or
not its own, resends a START only when STATUS shows it did not take effect, and trains
the same adapters as over a clean link.

- Against a fake transport (the model device behind `host.protocol.serve`, whose
  requests and responses a script drops, corrupts or answers wrongly), no board needed.
- On the simulated board (`rtl`) with ``--link-faults 0.01``: the same adapters as the
  model device, with retries counted.
"""

import dataclasses
import random

import pytest

from firmware.memmap import Region, address
from gateware.config import DEFAULT
from host import protocol as P
from host.datasets import load_workload
from host.device import Device, DeviceError, open_device
from host.models import load_base_model
from host.transport import ModelTransport
from sim.finetune import Schedule

from tests.test_cli import FT, run_many

C = P.Command


class FlakyTransport(ModelTransport):
    """The model device behind a link that misbehaves on cue: ``script`` maps a command to
    the actions for its successive requests ("drop_request", "drop_response",
    "corrupt_response", "wrong_cmd", "late": the response arrives after the next
    request's), and ``rate`` applies them at random (``rng``) to any request."""

    ACTIONS = ("drop_request", "drop_response", "corrupt_response", "late")

    def __init__(self, script=None, rate=0.0, seed=0):
        super().__init__()
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.rate, self.rng = rate, random.Random(seed)
        self.starts = 0             # START requests that reached the device
        self.log = []
        self.frames = []
        self._late = b""

    def write(self, data):
        frame = P.decode_frame(data)
        actions = self.script.get(frame.cmd)
        action = actions.pop(0) if actions else None
        if action is None and self.rate and self.rng.random() < self.rate:
            action = self.rng.choice(self.ACTIONS)
        self.log.append((C(frame.cmd).name, action))
        self.frames.append(frame)
        if action == "drop_request":
            return
        if frame.cmd == C.START:
            self.starts += 1
        mark = len(self._out)
        super().write(data)
        response = bytes(self._out[mark:])
        del self._out[mark:]
        self._out += self._late
        self._late = b""
        if action == "drop_response":
            response = b""
        elif action == "corrupt_response":
            response = response[:-3] + bytes([response[-3] ^ 0x10]) + response[-2:]
        elif action == "wrong_cmd":
            response = P.encode_frame(C.IDENTIFY | P.RESPONSE, frame.seq, bytes(12))
        elif action == "late":
            self._late, response = response, b""
        self._out += response


def flaky_device(**kw):
    t = FlakyTransport(**kw)
    return t, Device(t, DEFAULT, "model", timeout=0.01, settle=0.0, quiet=0.002)


def test_idempotent_requests_are_retried():
    base = address(Region.ADAPTERS, 0, DEFAULT)
    t, dev = flaky_device(script={C.WRITE: ["drop_request", "corrupt_response", "late"],
                                  C.READ: ["drop_response", "wrong_cmd", "corrupt_response"],
                                  C.IDENTIFY: ["late"]})
    dev.identify()
    words = list(range(1, 301))
    dev.write_words(base, words)
    assert dev.read_words(base, 300) == words
    assert dev.retry_counts == {"IDENTIFY": 1, "WRITE": 3, "READ": 3}
    assert dev.link_errors["mismatch"] == 1 and dev.link_errors["bad_frame"] == 2
    # every attempt had a new seq; the late responses were discarded as stale
    assert dev.burst < P.MAX_WORDS              # the bursts shrank after the failures


def test_chunked_writes_start_on_whole_words():
    """A resent WRITE must not start mid-word in a chunked region (BIASES: 8 chunks a
    word): the bursts end on whole words, whatever the burst size."""
    from firmware.memmap import chunk_bits
    unit = 1 << chunk_bits(Region.BIASES, DEFAULT)
    assert unit > 1
    t, dev = flaky_device(script={C.WRITE: ["drop_response", "late"]})
    dev.burst = 3
    dev.write_words(address(Region.BIASES, 0, DEFAULT), list(range(4 * unit)))
    starts = [int.from_bytes(f.payload[:4], "little") for f in t.frames if f.cmd == C.WRITE]
    assert len(starts) > 4 and all(a % unit == 0 for a in starts)


def test_attempts_run_out_with_one_line():
    t, dev = flaky_device(script={C.WRITE: ["drop_response"] * 12})
    with pytest.raises(DeviceError) as e:
        dev.write_words(address(Region.ADAPTERS, 0, DEFAULT), [1, 2, 3])
    msg = str(e.value)
    assert msg.startswith("model: no valid response to WRITE after 12 attempts (")
    assert "\n" not in msg
    assert [a for c, a in t.log] == ["drop_response"] * 12


@pytest.fixture(scope="module")
def digits():
    return load_workload("digits", "rotate:30", None), load_base_model("digits", None)


@pytest.mark.parametrize("action", ["drop_response", "corrupt_response", "late", "drop_request"])
def test_lost_start_runs_once(digits, action):
    """A START whose response is lost (or that never arrived) is resolved by STATUS: the
    program runs exactly once, and the accuracy is the clean link's."""
    wl, model = digits
    tg = wl.target_test
    x, y = tg.x[:40], tg.y[:40]
    clean = Device(ModelTransport(), DEFAULT, "model").evaluate(model, None, x, y)
    t, dev = flaky_device(script={C.START: [action]})
    assert dev.evaluate(model, None, x, y) == clean
    starts = [a for c, a in t.log if c == "START"]
    if action == "drop_request":
        assert starts == [action, None] and t.starts == 1      # resent: the first never arrived
        assert dev.retry_counts == {"START": 1}
    else:
        assert starts == [action] and t.starts == 1            # STATUS showed it ran
        assert "START" not in dev.retry_counts


def test_start_refused_as_running_after_a_lost_start_means_it_started():
    """STATUS cannot tell (it looks untouched), so the START is resent; the device refuses
    it as running: the first START took effect, and the program runs once."""
    t, dev = flaky_device(script={C.START: ["drop_response"]})
    runs = []

    def run(entry=0, max_steps=None):
        runs.append(entry)
        t.machine.running = True                # a long program: still running

    t.machine.run = run
    dev.request(P.loaded)                       # the model flag: START needs it
    before = dev.status()
    dev.status = lambda: before
    dev.start(0, before)
    assert runs == [0] and [c for c, a in t.log] == ["LOADED", "STATUS", "START", "START"]


def test_lost_start_of_a_rerun_is_not_resent():
    """The same program run twice: after the second run every port register reads as it
    did before it (the model has no cycle counters), so only STATUS's START count tells
    the host that the START whose response was lost took effect: the program runs twice,
    not three times, and each run reports DONE."""
    from firmware.asm import assemble
    from firmware.compiler import Program

    t, dev = flaky_device(script={C.START: [None, "drop_response"]})
    program = Program("infer", assemble("SETIDX 5\nINCIDX\nHALT"), 0, "", {}, 0, 0, 4, 1, 0, [], {})
    dev.request(P.loaded)
    first = dev.run(program)
    second = dev.run(program)
    assert t.starts == 2 and [a for c, a in t.log if c == "START"] == [None, "drop_response"]
    assert "START" not in dev.retry_counts
    assert (first.starts, second.starts) == (1, 2)
    assert dataclasses.replace(second, starts=1) == first       # nothing else tells them apart


def test_finetune_over_a_flaky_link_equals_clean(digits):
    wl, model = digits
    tr = wl.target_train
    schedule = Schedule(epochs=2)
    clean = Device(ModelTransport(), DEFAULT, "model").finetune(model, tr.x, tr.y, schedule)
    t, dev = flaky_device(rate=0.05, seed=3)
    res = dev.finetune(model, tr.x, tr.y, schedule)
    assert res.sha256 == clean.sha256
    assert t.starts == 1
    assert sum(res.link["retries"].values()) > 0
    assert res.link["retries"] == dev.retry_counts


def test_link_faults_need_rtl(capsys):
    with pytest.raises(DeviceError, match="--link-faults needs --device rtl"):
        open_device("model", faults=0.01)
    from host.cli import main
    assert main(["info", "--device", "model", "--link-faults", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err == "skiptune: error: --link-faults needs --device rtl (the simulated board), not model\n"


def test_rtl_with_link_faults_equals_model(digits):
    """The simulated board with 1 % link faults: the same adapters as the model device,
    with retries; and the CLI on it exits 0 and reports the faults."""
    from sim.board import missing_reason
    reason = missing_reason()
    if reason:
        pytest.skip(f"rtl device: {reason}")
    wl, model = digits
    tr = wl.target_train
    schedule = Schedule(epochs=2)
    clean = open_device("model").finetune(model, tr.x, tr.y, schedule)
    with open_device("rtl", faults=0.01, seed=7) as dev:
        res = dev.finetune(model, tr.x, tr.y, schedule)
        board = dev.transport.board
    assert res.sha256 == clean.sha256
    assert sum(res.link["retries"].values()) > 0
    faults = board.stats["faults"]
    assert sum(faults["h2d"].values()) > 0 and sum(faults["d2h"].values()) > 0
    p = run_many({"info": ["info", "--device", "rtl", "--link-faults", 0.02, "--fault-seed", 3, "--json", "-"]})["info"]
    assert p.returncode == 0, p.stderr[-2000:]
    assert "board: faults h2d" in p.stderr
    print(f"rtl with 1% link faults: {res.seconds:.1f} s, retries {res.link['retries']}, "
          f"errors {dev.link_errors}, faults {faults}")
