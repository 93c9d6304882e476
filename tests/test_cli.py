"""The `skiptune` command line, run as a user runs it: a subprocess,
``python -m host.cli ...`` from the repository root.

The successful runs are shared through module-scoped fixtures (started together, in
parallel) so that the whole file stays a few seconds long.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAN_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets", "cooling-fan"))
DIGITS_MODEL = os.path.join(ROOT, "host", "models", "digits.npz")
FAN_MODEL = os.path.join(ROOT, "host", "models", "fan.npz")

EPOCHS = 2
FT = ["finetune", "--workload", "digits", "--drift", "rotate:30", "--epochs", str(EPOCHS)]
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX8 = re.compile(r"^[0-9a-f]{8}$")


def cli(*args):
    return [sys.executable, "-m", "host.cli", *[str(a) for a in args]]


def run(*args, timeout=180):
    return subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_many(commands, timeout=180):
    """Start several CLI runs at once; returns {name: CompletedProcess}."""
    procs = {name: subprocess.Popen(cli(*args), cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stdout + res.stderr
    return res


def assert_user_error(res, *fragments):
    """Exit 2, exactly one line on stderr starting with 'skiptune: error:', no traceback."""
    both = res.stdout + res.stderr
    assert "Traceback" not in both, both
    assert res.returncode == 2, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("skiptune: error:"), lines[0]
    assert len(lines[0]) > len("skiptune: error: "), lines[0]
    assert res.stdout == "", res.stdout
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def need_fan_data():
    if not os.path.isdir(FAN_DATA):
        pytest.skip(f"cooling-fan data not found at {FAN_DATA}")
    return FAN_DATA


# ====================================================================== shared runs

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def _shared_dir(tmp_path_factory):
    """Under pytest-xdist, a folder that all workers of this session share (so that the
    expensive runs happen once per session); otherwise this process's own folder."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.getbasetemp().parent
    return tmp_path_factory.getbasetemp()


def _do_runs(work):
    adapters = work / "adapters.npz"
    first = run_many({
        "ft": FT + ["--json", work / "ft.json", "--save-adapters", adapters],
        "ft_stdout": FT + ["--json", "-"],                               # the same run again
        "ft_nocache": FT + ["--cache", "off", "--json", work / "nocache.json"],
        "ft_4bit": FT + ["--cache-bits", "4", "--json", work / "4bit.json"],
        "eval_base": ["eval", "--workload", "digits", "--drift", "rotate:30", "--json", work / "eval_base.json"],
        "info": ["info", "--json", "-"],
    })
    second = {}
    if first["ft"].returncode == 0:
        second = run_many({
            "eval_adapters": ["eval", "--workload", "digits", "--drift", "rotate:30", "--adapters", adapters,
                              "--json", work / "eval_adapters.json"],
            "eval_adapters_stdout": ["eval", "--workload", "digits", "--drift", "rotate:30",
                                     "--adapters", adapters, "--json", "-"],
        })
    return {name: {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
            for name, r in {**first, **second}.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every successful run the checks below look at, started together, once per session."""
    import fcntl
    work = _shared_dir(tmp_path_factory) / "cli-shared-runs"
    work.mkdir(exist_ok=True)
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = work / "runs.json"
        if not done.exists():
            done.write_text(json.dumps(_do_runs(work)))
        raw = json.loads(done.read_text())
    return SharedRuns(work, raw)


class SharedRuns:
    """The shared runs; a run that failed fails only the tests that look at it."""

    FILES = {"ft": "ft.json", "ft_nocache": "nocache.json", "ft_4bit": "4bit.json",
             "eval_base": "eval_base.json", "eval_adapters": "eval_adapters.json"}

    def __init__(self, work, raw):
        self.work = work
        self.raw = raw
        self.adapters = work / "adapters.npz"

    def res(self, name):
        assert name in self.raw, f"{name} did not run (the first fine-tune failed)"
        r = self.raw[name]
        return ok(subprocess.CompletedProcess(name, r["returncode"], r["stdout"], r["stderr"]))

    def json(self, name):
        res = self.res(name)
        if name in self.FILES:
            return json.loads((self.work / self.FILES[name]).read_text())
        return json.loads(res.stdout)        # a --json - run: the whole of stdout is JSON


# ====================================================================== entry points

def test_python_m_host_cli_help():
    res = ok(run("--help"))
    assert res.stdout.startswith("usage: skiptune")
    for cmd in ("info", "finetune", "eval"):
        assert cmd in res.stdout


def test_installed_entry_point(work):
    exe = os.path.join(os.path.dirname(sys.executable), "skiptune")
    if not os.path.isfile(exe):
        pytest.skip(f"no installed skiptune script beside {sys.executable}")
    res = subprocess.run([exe, "info", "--json", "-"], cwd=str(work), capture_output=True, text=True, timeout=60)
    ok(res)
    assert json.loads(res.stdout)["device"] == "model"


def test_info_json(runs):
    info = runs.json("info")
    assert info["device"] == "model"
    assert HEX8.match(info["config_hash"]), info["config_hash"]
    assert isinstance(info["config"], dict) and info["config"]


def test_info_text():
    res = ok(run("info"))
    line = res.stdout.strip()
    assert line.startswith("skiptune device model: config ")
    assert len(res.stdout.splitlines()) == 1


# ====================================================================== finetune

def test_finetune_json_record(runs):
    r = runs.json("ft")
    required = {"accuracy_before", "accuracy_after", "source_accuracy_before", "source_accuracy_after",
                "samples", "epochs", "finetune_seconds", "adapters_sha256", "macs", "cache_hits",
                "cache_misses", "frozen_forwards", "config_hash"}
    assert required <= set(r), required - set(r)
    assert r["samples"] == 359
    assert r["epochs"] == EPOCHS
    assert r["workload"] == "digits" and r["drift"] == "rotate:30" and r["device"] == "model"
    assert r["target_test_samples"] == 360 and r["source_test_samples"] == 216
    assert isinstance(r["finetune_seconds"], float) and r["finetune_seconds"] > 0
    assert HEX64.match(r["adapters_sha256"]), r["adapters_sha256"]
    assert HEX8.match(r["config_hash"])
    assert r["config_hash"] == runs.json("info")["config_hash"]
    # with the cache on, each sample goes through the frozen network once; the first
    # epoch fills the cache (misses), the later ones read it (hits)
    assert r["frozen_forwards"] == 359
    assert r["cache_misses"] == 359
    assert r["cache_hits"] == 359 * (EPOCHS - 1)
    assert isinstance(r["macs"], dict)
    assert r["macs"]["frozen_forward"] > 0 and r["macs"]["adapters"] > 0
    # the model device speaks the UART protocol: the link's bytes; it has no cycle counters
    assert r["link_bytes"]["sent"] > 359 * 64 and r["link_bytes"]["received"] > 0
    assert r["cycles"] is None and r["baud"] == 3_000_000
    s = r["schedule"]
    assert (s["epochs"], s["batch"], s["rank"], s["cache"], s["cache_bits"]) == (EPOCHS, 20, 4, "on", 8)


def test_finetune_accuracies(runs):
    r = runs.json("ft")
    for k, n in (("accuracy_before", 360), ("accuracy_after", 360),
                 ("source_accuracy_before", 216), ("source_accuracy_after", 216)):
        assert 0.0 <= r[k] <= 1.0, k
        assert abs(r[k] * n - round(r[k] * n)) < 1e-6, (k, r[k])      # a count over n test samples
    # the base model knows the source domain; the drift hurts it; fine-tuning helps
    assert r["source_accuracy_before"] > 0.9
    assert r["accuracy_before"] < 0.7
    assert r["accuracy_after"] > r["accuracy_before"] + 0.1


def test_finetune_table_on_stdout(runs):
    out = runs.res("ft").stdout
    r = runs.json("ft")
    assert out.startswith("skiptune finetune: digits rotate:30 on device model")
    line = next(l for l in out.splitlines() if "target-test accuracy" in l)
    assert f"{r['accuracy_before']:.4f}" in line and f"{r['accuracy_after']:.4f}" in line
    assert "source-test accuracy" in out
    sha_line = next(l for l in out.splitlines() if "adapters sha256" in l)
    assert sha_line.split()[-1] == r["adapters_sha256"]
    assert f"adapters saved to {runs.adapters}" in out
    assert runs.res("ft").stderr == ""      # no progress bar when stderr is not a terminal


def test_json_dash_is_only_json(runs):
    res = runs.res("ft_stdout")
    rec = json.loads(res.stdout)          # the whole of stdout
    assert rec["command"] == "finetune"
    assert "target-test accuracy" not in res.stdout
    assert res.stderr == ""
    info = runs.res("info")
    assert json.loads(info.stdout)["device"] == "model"
    json.loads(runs.res("eval_adapters_stdout").stdout)


def test_finetune_is_deterministic(runs):
    a, b = runs.json("ft"), runs.json("ft_stdout")
    assert a["adapters_sha256"] == b["adapters_sha256"]
    for k in ("accuracy_before", "accuracy_after", "source_accuracy_after", "macs", "frozen_forwards"):
        assert a[k] == b[k], k


def test_cache_off_gives_the_same_adapters(runs):
    on, off = runs.json("ft"), runs.json("ft_nocache")
    assert off["schedule"]["cache"] == "off"
    assert off["adapters_sha256"] == on["adapters_sha256"]
    assert off["accuracy_after"] == on["accuracy_after"]
    assert off["frozen_forwards"] == 359 * EPOCHS
    assert off["cache_hits"] == 0
    assert off["macs"]["frozen_forward"] == EPOCHS * on["macs"]["frozen_forward"]


def test_cache_bits_4_changes_the_adapters(runs):
    b8, b4 = runs.json("ft"), runs.json("ft_4bit")
    assert b4["schedule"]["cache_bits"] == 4
    assert HEX64.match(b4["adapters_sha256"])
    assert b4["adapters_sha256"] != b8["adapters_sha256"]
    assert b4["frozen_forwards"] == 359


# ====================================================================== eval

def test_eval_with_saved_adapters_matches_finetune(runs):
    ft, ev = runs.json("ft"), runs.json("eval_adapters")
    assert os.path.isfile(runs.adapters)
    assert ev["command"] == "eval" and ev["adapters"] == str(runs.adapters)
    assert ev["accuracy"] == ft["accuracy_after"]
    assert ev["source_accuracy"] == ft["source_accuracy_after"]
    assert runs.json("eval_adapters_stdout")["accuracy"] == ft["accuracy_after"]


def test_eval_without_adapters_is_the_base_model(runs):
    ft, ev = runs.json("ft"), runs.json("eval_base")
    assert ev["adapters"] is None
    assert ev["accuracy"] == ft["accuracy_before"]
    assert ev["source_accuracy"] == ft["source_accuracy_before"]
    out = runs.res("eval_base").stdout
    assert "no adapters" in out and f"{ft['accuracy_before']:.4f}" in out


def test_adapters_of_digits_refused_for_fan(runs):
    data = need_fan_data()
    res = run("eval", "--workload", "fan", "--data", data, "--adapters", runs.adapters)
    assert_user_error(res, str(runs.adapters))


def test_fan_finetune_runs():
    data = need_fan_data()
    res = ok(run("finetune", "--workload", "fan", "--data", data, "--epochs", EPOCHS, "--json", "-"))
    r = json.loads(res.stdout)
    assert r["workload"] == "fan" and r["drift"] == "env:noisy"
    assert r["samples"] == 423 and r["target_test_samples"] == 987 and r["source_test_samples"] == 282
    assert r["frozen_forwards"] == 423
    assert HEX64.match(r["adapters_sha256"])


# ====================================================================== user errors

@pytest.fixture(scope="module")
def bad_files(work):
    d = work / "bad"
    d.mkdir()
    # an MNIST folder whose image file is not IDX
    mnist = d / "mnist"
    mnist.mkdir()
    (mnist / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03" + bytes(100))
    (mnist / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes(3))
    files = {"mnist": mnist}
    # a small, well-formed MNIST folder (mnist has no shipped model: --model is the user's)
    good = d / "mnist_ok"
    good.mkdir()
    rng = np.random.default_rng(0)
    n = 20
    (good / "train-images-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
        + rng.integers(0, 256, n * 28 * 28, dtype=np.uint8).tobytes())
    (good / "train-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + bytes(i % 10 for i in range(n)))
    files["mnist_ok"] = good
    files["random"] = d / "random.bin"
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    files["text"] = d / "text.txt"
    files["text"].write_text("these are not adapters\n")
    files["npy"] = d / "array.npy"
    np.save(files["npy"], np.arange(10))
    files["npz_other"] = d / "other.npz"
    np.savez(files["npz_other"], x=np.arange(3))
    files["truncated_model"] = d / "truncated_model.npz"
    files["truncated_model"].write_bytes(open(DIGITS_MODEL, "rb").read()[:300])
    return files


@pytest.fixture(scope="module")
def bad_adapter_files(bad_files, runs, work):
    """bad_files, and two damaged copies of the adapters saved by the shared fine-tune."""
    runs.res("ft")
    files = dict(bad_files)
    files["truncated_adapters"] = work / "bad" / "truncated_adapters.npz"
    files["truncated_adapters"].write_bytes(runs.adapters.read_bytes()[:300])
    # well-formed, but the weights do not match their digest
    with np.load(runs.adapters) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["A0"] = arrays["A0"] + 1
    files["tampered"] = work / "bad" / "tampered.npz"
    np.savez(files["tampered"], **arrays)
    return files


@pytest.mark.parametrize("args, fragment", [
    (["finetune", "--workload", "nope", "--epochs", "2"], "nope"),
    (["finetune", "--drift", "spin:3", "--epochs", "2"], "spin:3"),
    (["eval", "--workload", "fan", "--drift", "rotate:30"], "rotate:30"),
    (["finetune", "--workload", "fan", "--data", "/nonexistent", "--epochs", "2"], "/nonexistent"),
    (["finetune", "--workload", "mnist", "--epochs", "2"], "--data"),
    (["eval", "--workload", "mnist", "--data", "/nonexistent"], "/nonexistent"),
    (["finetune", "--lr", "0", "--epochs", "2"], "learning rate"),
    (["finetune", "--epochs", "0"], "epochs"),
    (["finetune", "--batch", "0", "--epochs", "2"], "batch"),
    (["eval", "--workload", "digits", "--model", FAN_MODEL], "inputs"),
    (["info", "--json", "/nonexistent/dir/info.json"], "/nonexistent/dir/info.json"),
    (["finetune", "--epochs", "2", "--json", "/nonexistent/dir/ft.json"], "/nonexistent/dir/ft.json"),
    (["finetune", "--epochs", "2", "--save-adapters", "/nonexistent/dir/a.npz"], "/nonexistent/dir/a.npz"),
    (["finetune", "--epochs", "1", "--rank", "17"], "rank 17 > 16"),
    (["finetune", "--epochs", "1", "--batch", "300"], "batch 300 > 256"),
    (["finetune", "--epochs", "1", "--lr", "1e-6"], "step size"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_user_errors(args, fragment):
    assert_user_error(run(*args), fragment)


def test_mnist_corrupt_idx_folder(bad_files):
    res = run("finetune", "--workload", "mnist", "--data", bad_files["mnist"], "--epochs", "2")
    assert_user_error(res, "corrupt IDX", "train-images-idx3-ubyte")


@pytest.mark.parametrize("kind", ["random", "npz_other", "tampered", "truncated_adapters", "npy"])
def test_eval_refuses_bad_adapters_file(bad_adapter_files, kind):
    res = run("eval", "--adapters", bad_adapter_files[kind])
    assert_user_error(res, str(bad_adapter_files[kind]))


def mnist_eval(bad_files, *args):
    return run("eval", "--workload", "mnist", "--data", bad_files["mnist_ok"], "--drift", "none", *args)


@pytest.mark.parametrize("kind", ["text", "npz_other", "truncated_model", "npy", "random"])
def test_refuses_bad_model_file(bad_files, kind):
    assert_user_error(mnist_eval(bad_files, "--model", bad_files[kind]), str(bad_files[kind]))


def test_mnist_needs_a_model(bad_files):
    assert_user_error(mnist_eval(bad_files), "--model")
    assert_user_error(mnist_eval(bad_files, "--model", "/nonexistent/model.npz"), "/nonexistent/model.npz")


def test_mnist_with_a_model_of_other_inputs(bad_files):
    assert_user_error(mnist_eval(bad_files, "--model", DIGITS_MODEL), "inputs")


def test_model_file_given_as_adapters_is_refused():
    assert_user_error(run("eval", "--adapters", DIGITS_MODEL), DIGITS_MODEL)


@pytest.mark.parametrize("cmd", [["info"], ["eval"], ["finetune", "--epochs", "2"]])
def test_unknown_device_is_refused_cleanly(cmd):
    assert_user_error(run(*cmd, "--device", "fpga"), "fpga", "model, rtl, serial")


def test_serial_device_needs_a_port():
    assert_user_error(run("info", "--device", "serial"), "--port")
    assert_user_error(run("info", "--device", "serial", "--port", "/nonexistent/tty"), "/nonexistent/tty")
    # a port path names the serial device directly
    assert_user_error(run("info", "--device", "/nonexistent/tty"), "/nonexistent/tty")


def test_mnist_flow_from_the_readme(bad_files, tmp_path):
    """README: train a base model on the user's IDX files, fine-tune with it, then eval
    with the saved adapters. The model must fit the default configuration."""
    model, adapters, record = tmp_path / "mnist.npz", tmp_path / "a.npz", tmp_path / "ft.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pretrain.py"), "mnist",
                          "--data", str(bad_files["mnist_ok"]), "--out", str(model)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    ok(res)
    common = ["--workload", "mnist", "--data", bad_files["mnist_ok"], "--model", model]
    ok(run("finetune", *common, "--epochs", "2", "--json", record, "--save-adapters", adapters))
    ft = json.loads(record.read_text())
    assert ft["samples"] == expected_mnist_target_train(20) and ft["frozen_forwards"] == ft["samples"]
    assert HEX64.match(ft["adapters_sha256"])
    ev = json.loads(ok(run("eval", *common, "--adapters", adapters, "--json", "-")).stdout)
    assert ev["accuracy"] == ft["accuracy_after"]


def expected_mnist_target_train(n):
    return (n - int(n * 0.6)) // 2


def test_finetune_over_the_protocol_equals_finetune_fixed(runs):
    """`--device model` runs the compiled program over the UART protocol; the adapters
    are those of the bit-exact sim.finetune.finetune_fixed."""
    from gateware.config import DEFAULT
    from host.datasets import load_workload
    from host.models import load_base_model
    from sim.finetune import Schedule, adapters_sha256, finetune_fixed

    tr = load_workload("digits", "rotate:30", None).target_train
    ref = finetune_fixed(load_base_model("digits", None), tr.x, tr.y, Schedule(epochs=EPOCHS), DEFAULT)
    assert runs.json("ft")["adapters_sha256"] == adapters_sha256(ref.masters)
