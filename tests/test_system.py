"""System test: the `skiptune` CLI fine-tunes digits on the simulated board (the `rtl`
device: the Verilated gateware behind a pseudo-terminal, speaking the UART protocol) and
on the `model` device (the instruction-level golden model behind the same protocol);
both must train the same adapters, to the bit, and reach the same accuracy."""

import json

import pytest

from sim.board import missing_reason
from tests.test_cli import FT, run_many

EPOCHS = 3


def test_rtl_device_equals_model_device(tmp_path):
    reason = missing_reason()
    if reason:
        pytest.skip(f"rtl device: {reason}")
    args = {dev: [*FT[:-2], "--epochs", EPOCHS, "--device", dev, "--quiet", "--json", tmp_path / f"{dev}.json"]
            for dev in ("rtl", "model")}
    # the first run may build the simulated board (about 2 minutes on 2 cores)
    procs = run_many(args, timeout=900)
    for dev, p in procs.items():
        assert p.returncode == 0, f"{dev}: {p.stderr[-2000:]}"
    rtl, model = (json.loads((tmp_path / f"{dev}.json").read_text()) for dev in ("rtl", "model"))
    assert rtl["adapters_sha256"] == model["adapters_sha256"]
    for key in ("accuracy_before", "accuracy_after", "source_accuracy_before", "source_accuracy_after",
                "cache_hits", "cache_misses", "frozen_forwards"):
        assert rtl[key] == model[key], key
    # the board counts cycles; the model does not
    assert rtl["cycles"]["total"] > 0 and model["cycles"] is None
    assert rtl["link_bytes"]["sent"] > 30000
    print(f"rtl: {rtl['finetune_seconds']:.1f} s, {rtl['cycles']['total']} cycles, "
          f"link {rtl['link_bytes']}; model: {model['finetune_seconds']:.1f} s")
