"""`skiptune bench`: the quick run end to end (through `host.cli.main`, on the simulated
board), its JSON's shape and internal consistency; the CPU implementations against the
float reference; the clock it states; its one-line errors."""

import json
import math
import os

import numpy as np
import pytest

from gateware.config import board_config
from host.bench import bitstream_clock, numpy_finetune, torch_finetune
from host.cli import main
from host.datasets import load_workload
from host.models import load_base_model
from sim.board import missing_reason
from sim.finetune import Schedule, finetune_float
from tests.test_cli import FAN_DATA

BOARD = "ulx3s-85f"
REPORT_MHZ = 50.0       # the clock of the bitstream report the quick run is given


def close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _report(path, cfg, mhz=REPORT_MHZ, config_hash=None):
    # the fields of platforms.build's report.json that the bench reads
    path.write_text(json.dumps({"board": BOARD, "config_hash": config_hash or f"{cfg.hash:08x}",
                                "target_mhz": mhz, "fmax_mhz": mhz + 5.0, "timing_met": True}))
    return path


def _check_device(run, e, cfg, clock_hz, cache):
    n, epochs = e["samples"], e["epochs"]
    c = run["cycles"]
    assert run["cache"] == ("on" if cache else "off") and run["epochs"] == epochs
    # "other" is total - frozen - cached (host.bench): the phase counters fit inside the total
    assert c["frozen"] > 0 and c["other"] >= 0
    for phase in ("frozen", "cached", "other", "total"):
        assert close(run["seconds"][phase], c[phase] / clock_hz)
    assert len(run["epoch_seconds"]) == epochs
    assert close(sum(run["epoch_seconds"]), (c["frozen"] + c["cached"]) / clock_hz)
    per = e["macs_per_sample"]
    m = run["macs"]
    assert m["frozen_forward"] == run["frozen_forwards"] * per["frozen_forward"]
    assert m["adapters"] == n * epochs * per["adapters"]
    phases = m["per_phase"]
    assert phases["frozen"]["array"] + phases["cached"]["array"] == m["frozen_forward"]
    assert phases["frozen"]["adapters"] + phases["cached"]["adapters"] == m["adapters"]
    pes = cfg.array_rows * cfg.array_cols
    for phase in ("frozen", "cached"):
        u = run["mac_utilization"][phase]
        if c[phase]:
            assert close(u["array"], phases[phase]["array"] / (c[phase] * pes))
            assert 0 <= u["array"] <= 1 and 0 < u["adapter_lanes"] <= 1
    overflow = max(0, n - cfg.cache_samples)
    if cache:
        assert c["cached"] > 0
        assert run["cache_overflow_samples"] == overflow
        assert run["cache_hits"] + run["cache_misses"] == n * epochs
        # past the capacity, the frozen path runs every epoch
        assert run["frozen_forwards"] == n + (epochs - 1) * overflow
    else:
        assert c["cached"] == 0 and run["frozen_forwards"] == n * epochs
    link = run["link"]
    assert link["sent"] > 0 and link["received"] > 0 and link["status_polls"] >= 2
    assert close(link["transfer_seconds"], 10 * (link["sent"] + link["received"]) / cfg.baud)
    assert link["transfer_seconds_without_polls"] < link["transfer_seconds"]
    assert 0 <= run["target_accuracy_after"] <= 1


def _check_cpu(cpu, epochs):
    assert cpu["primary"] in cpu["backends"] and "numpy" in cpu["backends"]
    seen = {(r["backend"], r["threads"], r["cache"]) for r in cpu["runs"]}
    assert seen == {(b, k, c) for b in cpu["backends"] for k in cpu["threads"] for c in ("on", "off")}
    for r in cpu["runs"]:
        assert len(r["epoch_seconds"]) == epochs and all(t > 0 for t in r["epoch_seconds"])
        assert close(r["seconds"], sum(r["epoch_seconds"]))
        assert r["seconds"] in r["all_seconds"]
        # the same fine-tune as the float64 reference: float32 rounding apart
        assert r["relative_diff_vs_reference"] < (1e-3 if r["dtype"] == "float32" else 1e-9)
        assert 0 <= r["target_accuracy_after"] <= 1
    fastest = min((r for r in cpu["runs"] if r["cache"] == "on"), key=lambda r: r["seconds"])
    assert cpu["fastest"]["seconds"] == fastest["seconds"]


def test_bench_quick(tmp_path, capsys):
    reason = missing_reason()
    if reason:
        pytest.skip(f"rtl device: {reason}")
    workloads = ["digits", "fan"] if os.path.isdir(FAN_DATA) else ["digits"]
    cfg = board_config(BOARD)
    report = _report(tmp_path / "report.json", cfg)
    out = tmp_path / "bench"
    # the first run of the board's configuration builds its simulated board (minutes).
    # One CPU thread: on a shared, loaded machine a multi-threaded PyTorch run of these
    # tiny matrices can take seconds per epoch (its threads wait on each other's time
    # slices); the multi-threaded path is run by test_cpu_implementations_are_the_reference.
    rc = main(["bench", "--quick", "--threads", "1", "--workloads", ",".join(workloads), "--out", str(out),
               "--report", str(report), "--json", str(tmp_path / "copy.json"), "--quiet"])
    captured = capsys.readouterr()
    stdout = captured.out
    assert rc == 0, captured.err[-2000:]
    rec = json.loads((out / "report.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text()) == rec
    assert (out / "report.md").read_text() in stdout
    assert (out / "epochs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rec["quick"] and rec["schedule"]["epochs"] == 2
    dev = rec["device"]
    assert dev["board"] == BOARD and dev["config_hash"] == f"{cfg.hash:08x}"
    assert dev["clock_hz"] == REPORT_MHZ * 1e6 and dev["clock"]["report"] == str(report)
    assert dev["pes"] == cfg.array_rows * cfg.array_cols and dev["cache_samples"] == cfg.cache_samples
    assert list(rec["workloads"]) == workloads
    for name, e in rec["workloads"].items():
        assert e["epochs"] == 2
        for key, cache in (("cache_on", True), ("cache_off", False)):
            _check_device(e["device"][key], e, cfg, dev["clock_hz"], cache)
        on, off = e["device"]["cache_on"], e["device"]["cache_off"]
        s = e["cache_speedup"]
        assert close(s["measured"], off["cycles"]["total"] / on["cycles"]["total"])
        assert close(s["ideal"], off["macs"]["total"] / on["macs"]["total"])
        assert close(s["fraction_of_ideal"], s["measured"] / s["ideal"])
        # cache on and off train the same adapters on the device, to the bit
        assert s["same_adapters"], name
        _check_cpu(e["cpu"], 2)
        for key, cmp in e["device_vs_cpu"].items():
            assert close(cmp["device_seconds"], on["seconds"]["total"])
            assert close(cmp["cpu_over_device"] * cmp["device_over_cpu"], 1.0)
        print(f"{name}: cycles on {on['cycles']['total']}, off {off['cycles']['total']}, "
              f"speedup {s['measured']:.2f} of ideal {s['ideal']:.2f}")


def test_cpu_implementations_are_the_reference():
    """PyTorch (in float64 here) and the NumPy cache-off loop train the adapters that
    `sim.finetune.finetune_float` trains, with and without the activation cache; PyTorch
    on two threads too (on 40 samples: on a loaded machine its threads are slow)."""
    try:
        import torch  # noqa: F401
        runs = [("torch", 1)]
    except ImportError:
        runs = []
    cfg = board_config(BOARD)
    for name in ("digits", "fan") if os.path.isdir(FAN_DATA) else ("digits",):
        wl = load_workload(name)
        model = load_base_model(name, None)
        tr = wl.target_train
        cases = [(len(tr), [("numpy", 1), *runs])]
        if runs and name == "digits":
            cases.append((40, [("torch", 2)]))
        for n, variants in cases:
            x, y = tr.x[:n], tr.y[:n]
            ref = finetune_float(model, x, y, Schedule(epochs=2), cfg)
            for (backend, threads), cache in ((v, c) for v in variants for c in (True, False)):
                s = Schedule(epochs=2, cache=cache)
                if backend == "numpy":
                    adapters = numpy_finetune(model, x, y, s, cfg)[0]
                else:
                    adapters = torch_finetune(model, x, y, s, cfg, "float64", threads)[0]
                for (a, b), (ra, rb) in zip(adapters, ref):
                    np.testing.assert_allclose(a, ra, rtol=0, atol=1e-10, err_msg=f"{name} {backend} {threads}")
                    np.testing.assert_allclose(b, rb, rtol=0, atol=1e-10, err_msg=f"{name} {backend} {threads}")


def test_clock_from_matching_report_only(tmp_path):
    cfg = board_config(BOARD)
    missing = bitstream_clock(cfg, tmp_path / "none.json")
    assert missing["hz"] == cfg.clock_hz and missing["report"] is None and "default" in missing["source"]
    other = bitstream_clock(cfg, _report(tmp_path / "other.json", cfg, 40.0, "0badc0de"))
    assert other["hz"] == cfg.clock_hz and "0badc0de" in other["source"]
    ours = bitstream_clock(cfg, _report(tmp_path / "ours.json", cfg, 40.0))
    assert ours["hz"] == 40_000_000 and ours["fmax_mhz"] == 45.0
    (tmp_path / "bad.json").write_text("{not json")
    assert bitstream_clock(cfg, tmp_path / "bad.json")["hz"] == cfg.clock_hz


@pytest.mark.parametrize("args, fragment", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--repeats", "-1"], "--repeats"),
    (["--threads", "x"], "--threads"),
    (["--workloads", "mnist"], "mnist"),
    (["--workloads", "speech"], "speech"),
    (["--workloads", ","], "--workloads"),
    (["--workloads", "digits,digits"], "twice"),
    (["--board", "icebreaker"], "icebreaker"),
    # before any simulation: every workload loads first
    (["--data", "/nonexistent/cooling-fan"], "/nonexistent/cooling-fan"),
])
def test_bad_options_one_line(args, fragment, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("skiptune: error:") and fragment in err[0], err


def test_epoch_cycles_from_phase_totals():
    """One epoch with the cache is the fill epoch alone (it raised ZeroDivisionError)."""
    from host.bench import epoch_cycles
    c = {"frozen": 1000, "cached": 1900}
    assert epoch_cycles(c, 1, True) == [1000]
    assert epoch_cycles(c, 20, True) == [1000] + [100.0] * 19
    assert epoch_cycles(c, 4, False) == [250.0] * 4
