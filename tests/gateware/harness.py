"""pytest-side driver of the cocotb tests: build a component on a simulator, run a
cocotb module against it, skip with the reason when the simulator is missing."""

import json

import pytest

from sim.rtl import RtlSim, missing_reason

SIMULATORS = ["verilator", "icarus"]


def run_cocotb(sim, name, component, module, cfg=None, env=None):
    """Build ``component`` as top-level ``name`` on ``sim`` and run the cocotb tests of
    ``module`` (dotted, e.g. "tests.gateware.cocotb_systolic"). The AccelConfig goes to
    the cocotb process as SKIPTUNE_CFG. Returns the RtlSim (build_seconds) and the
    number of tests and wall seconds of the run."""
    reason = missing_reason(sim)
    if reason:
        pytest.skip(f"{sim}: {reason}")
    rtl = RtlSim(f"{name}", component, sim)
    extra = {"SKIPTUNE_CFG": json.dumps(cfg.as_dict())} if cfg is not None else {}
    # cocotb rewrites the asserts of every module its process imports unless told which;
    # scikit-learn (the digits dataset) alone costs seconds per run.
    extra["COCOTB_REWRITE_ASSERTION_FILES"] = module.rsplit(".", 1)[-1] + ".py"
    extra.update(env or {})
    tests, wall = rtl.run(module, env=extra)
    return rtl, tests, wall
