"""host.device over the protocol: the `model` device (the instruction-level model behind
`host.protocol.serve`) fine-tunes and evaluates bit-exactly like sim.finetune, refuses
another configuration, and counts the link's bytes."""

import dataclasses

import numpy as np
import pytest

from firmware.memmap import Region, Status, address
from gateware.config import DEFAULT
from host import protocol as P
from host.datasets import load_workload
from host.device import Device, DeviceError, bursts, open_device
from host.models import load_base_model
from host.transport import ModelTransport
from sim.finetune import Schedule, adapters_sha256, evaluate_fixed, finetune_fixed


@pytest.fixture(scope="module")
def digits():
    wl = load_workload("digits", "rotate:30", None)
    return wl, load_base_model("digits", None)


@pytest.fixture(scope="module")
def device():
    return open_device("model")


class CountingTransport(ModelTransport):
    """A model transport that records the frames it is sent."""

    def __init__(self, cfg=DEFAULT):
        super().__init__(cfg)
        self.sent = []

    def write(self, data):
        self.sent.append(bytes(data))
        super().write(data)


@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
def test_finetune_equals_finetune_fixed(digits, device, cache):
    wl, model = digits
    tr = wl.target_train
    schedule = Schedule(epochs=3 if cache else 2, cache=cache)
    seen = []
    res = device.finetune(model, tr.x, tr.y, schedule, lambda d, t: seen.append((d, t)))
    ref = finetune_fixed(model, tr.x, tr.y, schedule, device.cfg)
    assert res.sha256 == adapters_sha256(ref.masters)
    assert all(np.array_equal(a, b) for m, r in zip(res.masters, ref.masters) for a, b in zip(m, r))
    assert (res.frozen_forwards, res.cache_hits, res.cache_misses) == \
        (ref.frozen_forwards, ref.cache_hits, ref.cache_misses)
    assert res.macs["frozen_forward"] == ref.frozen_macs and res.macs["adapters"] == ref.adapter_macs
    assert res.cycles is None                   # the model has no cycle counters
    total = schedule.epochs * -(-len(tr) // schedule.batch)
    assert seen and seen[-1] == (total, total)
    # the link carried at least the samples, and one response per request
    assert res.link["sent"] > len(tr) * model.adapter_inputs[0]
    assert res.link["received"] > 0


def test_evaluate_equals_evaluate_fixed(digits, device):
    wl, model = digits
    tr, tg = wl.target_train, wl.target_test
    masters = device.finetune(model, tr.x, tr.y, Schedule(epochs=2)).masters
    for m in (None, masters):
        assert device.evaluate(model, m, tg.x, tg.y) == evaluate_fixed(model, m, tg.x, tg.y, device.cfg)


def test_evaluate_in_chunks(digits):
    """A sample memory of 50 samples: the evaluation runs in chunks, same accuracy."""
    wl, model = digits
    tg = wl.target_test
    cfg = dataclasses.replace(DEFAULT, max_samples=50)
    dev = Device(ModelTransport(cfg), cfg, "model")
    assert dev.evaluate(model, None, tg.x, tg.y) == evaluate_fixed(model, None, tg.x, tg.y, cfg)


def test_config_mismatch_is_refused():
    other = dataclasses.replace(DEFAULT, cache_samples=DEFAULT.cache_samples // 2)
    assert other.hash != DEFAULT.hash
    dev = Device(ModelTransport(other), DEFAULT, "model")
    with pytest.raises(DeviceError) as e:
        dev.identify()
    msg = str(e.value)
    assert msg.startswith(f"device configuration {other.hash:08x}, host expects {DEFAULT.hash:08x} ")
    assert "\n" not in msg


def test_bytes_counted_and_bursts():
    t = CountingTransport()
    dev = Device(t, DEFAULT, "model")
    dev.identify()
    o = P.OVERHEAD_BYTES
    assert o == 9
    assert dev.bytes_sent == len(P.identify(1)) == o
    assert dev.bytes_received == o + 12
    base = address(Region.ADAPTERS, 0, DEFAULT)
    words = list(range(600))
    t.sent.clear()
    dev.write_words(base, words)
    assert [len(f) for f in t.sent] == [o + 4 + 4 * n for n in (256, 256, 88)]
    assert dev.read_words(base, 600) == words
    assert [len(f) for f in t.sent[3:]] == [o + 6] * 3
    assert dev.bytes_sent == o + sum(len(f) for f in t.sent)
    assert dev.bytes_received == o + 12 + 3 * o + sum(o + 4 * n for n in (256, 256, 88))
    # consecutive addresses merge; a gap starts a new burst
    assert bursts([(0, 1), (1, 2), (3, 3), (4, 4)]) == [(0, [1, 2]), (3, [3, 4])]


def test_device_errors_are_one_line(digits):
    t = ModelTransport()
    dev = Device(t, DEFAULT, "model", timeout=0.05, retries=1)
    with pytest.raises(DeviceError, match="RUNNING"):
        t.machine.running = True                # a program that has not stopped
        dev.write_words(address(Region.PROGRAM, 0, DEFAULT), [0])
    t.machine.running = False
    # a program word that is not an instruction stops with OPCODE
    from firmware.compiler import Program
    bad = Program("infer", [0xFFFFFFFF], 1, "", {}, 0, 0, 4, 1, 0, [], {})
    dev.request(P.loaded)
    with pytest.raises(DeviceError, match="error OPCODE at pc 0"):
        dev.run(bad)


def test_finetune_before_a_model_is_loaded(digits):
    """A fine-tune program started on a device that holds no whole model: after reset,
    and after another host wrote part of the weights (it died mid-transfer) following a
    complete load. The device refuses START (NO_MODEL), runs nothing, and the host says so
    in one line; the normal path (which loads the model, then LOADED) then works."""
    from firmware.compiler import compile_finetune, frozen_images, image_writes

    wl, model = digits
    tr = wl.target_train
    x, y = tr.x[:40], tr.y[:40]
    schedule = Schedule(epochs=1)
    program = compile_finetune(model, schedule, DEFAULT, len(y))
    t = ModelTransport()
    expected = ("model: device refused START: no model is loaded: the frozen network's weights "
                "and biases must be written whole, then LOADED, before a program runs (NO_MODEL, 6)")

    def refused():
        dev = Device(t, DEFAULT, "model")           # a new host process
        before = dev.status()
        with pytest.raises(DeviceError) as e:
            dev.run(program)
        assert str(e.value) == expected
        assert dev.status() == before and not before.status & Status.RUNNING     # nothing ran
        assert not t.machine.loaded

    refused()
    res = Device(t, DEFAULT, "model").finetune(model, x, y, schedule)
    assert t.machine.loaded
    first = image_writes(frozen_images(model, DEFAULT))[:100]
    Device(t, DEFAULT, "model").write_words(first[0][0], [w for _, w in first])
    refused()
    assert Device(t, DEFAULT, "model").finetune(model, x, y, schedule).sha256 == res.sha256
    assert res.sha256 == adapters_sha256(finetune_fixed(model, x, y, schedule, DEFAULT).masters)


def _trigger(code, dev, machine):
    """Make the model device answer a request with ``code``, for real."""
    E = P.ErrorCode
    if code is E.UNKNOWN_COMMAND:           # what an older bitstream answers a newer command
        dev.request(lambda seq: P.encode_frame(0x08, seq))
    elif code is E.BAD_LENGTH:
        dev.request(lambda seq: P.encode_frame(P.Command.STATUS, seq, b"?"))
    elif code is E.RUNNING:
        machine.running = True
        dev.write_words(address(Region.PROGRAM, 0, DEFAULT), [0])
    elif code is E.START_WHILE_RUNNING:
        before = dev.status()
        machine.running = True
        dev.start(0, before)
    elif code is E.BAD_ADDRESS:
        dev.read_words(0x0A000000, 1)
    elif code is E.NO_MODEL:
        dev.start(0, dev.status())
    else:
        raise AssertionError(f"no way to make the device answer {code.name}")


@pytest.mark.parametrize("code", list(P.ErrorCode), ids=lambda c: c.name)
def test_every_error_code_is_reported_in_one_line(code):
    """Each code the device can answer is raised by the host as one DeviceError line
    (the CLI prints it as ``skiptune: error: <line>``, exit 2) that names the device,
    the command, what the code means (host.protocol.ERROR_TEXT) and the code; an error
    response is never retried."""
    t = ModelTransport()
    dev = Device(t, DEFAULT, "model", timeout=0.05, retries=3)
    with pytest.raises(DeviceError) as e:
        _trigger(code, dev, t.machine)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200
    assert msg.startswith("model: device refused ")
    assert msg.endswith(f": {P.ERROR_TEXT[code]} ({code.name}, {code.value})")
    assert dev.retries_total == 0
    assert len(set(P.ERROR_TEXT.values())) == len(P.ErrorCode)      # each says something else
    # a code this host does not know (a newer bitstream) is still one line
    unknown = str(P.ProtocolError(P.Command.START, 42))
    assert "\n" not in unknown and unknown.endswith("(error 42, 42)")


def test_unknown_and_serial_without_port():
    with pytest.raises(DeviceError, match="unknown device"):
        open_device("fpga")
    with pytest.raises(DeviceError, match="--port"):
        open_device("serial")


def test_rtl_refuses_start_without_a_model():
    """The same on the simulated board (the gateware's link behind a pseudo-terminal):
    START before LOADED is refused in one line and runs nothing; after LOADED it runs."""
    from firmware.asm import assemble
    from firmware.compiler import Program
    from sim.board import missing_reason

    reason = missing_reason()
    if reason:
        pytest.skip(f"rtl device: {reason}")
    program = Program("infer", assemble("SETIDX 5\nINCIDX\nHALT"), 0, "", {}, 0, 0, 4, 1, 0, [], {})
    with open_device("rtl") as dev:
        before = dev.status()
        with pytest.raises(DeviceError) as e:
            dev.run(program)
        assert str(e.value) == "rtl: " + str(P.ProtocolError(P.Command.START, P.ErrorCode.NO_MODEL))
        assert dev.status() == before and before.starts == 0
        dev.request(P.loaded)
        st = dev.run(program)
        assert st.status & Status.DONE and st.index == 6 and st.starts == 1
