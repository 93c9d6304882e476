"""The whole accelerator (gateware/top.py) running compiled programs: the cocotb tests of
tests/gateware/cocotb_top.py on Verilator (the digits fine-tune, cache on, off and 4-bit,
then inference).

Not on Icarus: it simulates the whole device so slowly (a 12-sample, 2-epoch run of about
50 k cycles had not finished after 8 minutes of CPU) that it would dominate CI; every
block of the device has its own cocotb test on Icarus."""

import json
import os

import pytest

from gateware.config import DEFAULT
from gateware.top import Accelerator
from sim.rtl import ROOT, missing_reason
from tests.gateware.harness import run_cocotb

# SKIPTUNE_TOP_EPOCHS and SKIPTUNE_TOP_MODES may be set for longer runs (the 20-epoch
# figures of docs/device.md).
RUN = {"SKIPTUNE_TOP_EPOCHS": os.environ.get("SKIPTUNE_TOP_EPOCHS", "2"),
       "SKIPTUNE_TOP_MODES": os.environ.get("SKIPTUNE_TOP_MODES", "on,off,on4"),
       "SKIPTUNE_TOP_INFER": "100"}


def test_top_cocotb():
    sim = "verilator"
    reason = missing_reason(sim)
    if reason:
        pytest.skip(f"{sim}: {reason}")
    out = ROOT / "build" / "rtl" / f"top-{sim}-report.json"
    out.unlink(missing_ok=True)
    env = dict(RUN, SKIPTUNE_TOP_REPORT=str(out))
    rtl, tests, wall = run_cocotb(sim, "top", Accelerator(DEFAULT), "tests.gateware.cocotb_top",
                                  DEFAULT, env=env)
    report = json.loads(out.read_text())
    print(f"{sim}: build {rtl.build_seconds:.1f} s, {tests} test in {wall:.1f} s")
    print(json.dumps(report, indent=1))
    modes = [k for k in report if k.startswith("finetune_")]
    assert modes and "infer" in report
    # 8-bit activations are the same through the cache or recomputed: same adapters
    if "finetune_on" in report and "finetune_off" in report:
        assert report["finetune_on"]["sha256"] == report["finetune_off"]["sha256"]
