"""Measure the systolic array and the conv unit in simulation: build/bench/gemm.json.

    python scripts/bench_gemm.py            (make bench-gemm)

For each array size: large GEMMs streamed straight into the array, the same GEMMs and
every layer of the digits and fan models run by the layer engine (conv unit + array +
memories, from start to the last output word). Each row gives the simulated cycles,
the ideal cycles (MACs / (R * C)) and their ratio, the utilization. Everything runs on
Verilator and is checked bit-exact while it is measured.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateware.config import AccelConfig  # noqa: E402
from gateware.layer_engine import LayerEngine  # noqa: E402
from gateware.systolic import SystolicArray  # noqa: E402
from sim.rtl import ROOT, RtlSim, missing_reason  # noqa: E402

ARRAYS = ((4, 4), (8, 8))
GEMMS = [[64, 64, 64], [128, 128, 128], [256, 128, 64], [100, 300, 50]]
OUT = ROOT / "build" / "bench" / "gemm.json"


def measure(name, component, module, tests, cfg, env):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        env = dict(env, SKIPTUNE_CFG=json.dumps(cfg.as_dict()), SKIPTUNE_BENCH_OUT=out)
        rtl = RtlSim(name, component)
        rows = {}
        for test in tests:
            rtl.run(module, env=env, testcase=test)
            with open(out) as f:
                rows.update(json.load(f))
        return rows


def main():
    reason = missing_reason("verilator")
    if reason:
        print(f"bench-gemm: {reason}", file=sys.stderr)
        return 2
    report = {"note": "cycles from simulation (Verilator); ideal = MACs / (rows * cols)",
              "arrays": {}}
    start = time.monotonic()
    for rows, cols in ARRAYS:
        key = f"{rows}x{cols}"
        print(f"bench-gemm: {key} array ...", file=sys.stderr, flush=True)
        cfg = AccelConfig(array_rows=rows, array_cols=cols)
        env = {"SKIPTUNE_GEMM_SIZES": json.dumps(GEMMS)}
        array = measure(f"systolic_{key}", SystolicArray.from_config(cfg),
                        "tests.gateware.cocotb_systolic", ["throughput"], cfg, env)
        # the engine needs room for the large GEMMs' operands
        big = cfg.replace(act_words=16384, weight_words=65536)
        print(f"bench-gemm: {key} layer engine ...", file=sys.stderr, flush=True)
        engine = measure(f"bench_engine_{key}", LayerEngine(big), "tests.gateware.cocotb_conv",
                         ["digits_network", "fan_network", "gemm"], big, env)
        for rows_ in list(array.values()) + list(engine.values()):
            for row in rows_:
                row["utilization"] = round(row["ideal"] / row["cycles"], 4)
        report["arrays"][key] = {"array_gemm": array["array"], "engine_gemm": engine["gemm"],
                                 "digits": engine["digits"], "fan": engine["fan"]}
    report["wall_seconds"] = round(time.monotonic() - start, 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    for key, r in report["arrays"].items():
        print(f"{key}:")
        for row in r["array_gemm"]:
            print(f"  array  gemm {row['m']}x{row['k']}x{row['n']}: {row['cycles']} cycles, "
                  f"utilization {row['utilization']:.3f}")
        for row in r["engine_gemm"]:
            print(f"  engine gemm {row['m']}x{row['k']}x{row['n']}: {row['cycles']} cycles, "
                  f"utilization {row['utilization']:.3f}")
        for model in ("digits", "fan"):
            for row in r[model]:
                print(f"  {model} layer {row['layer']}: {row['cycles']} cycles, ideal "
                      f"{row['ideal']:.0f}, utilization {row['utilization']:.3f}")
    print(f"wrote {OUT.relative_to(ROOT)} in {report['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
