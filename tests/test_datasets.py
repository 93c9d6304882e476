"""Workloads, splits, drift specs and data-file readers (host/datasets.py).

The reference is ../shared/WORKLOADS.md and the cooling-fan README. The fan data is read
where it lies (../shared/datasets/cooling-fan); the tests that need it skip, with the
reason, when it is missing. MNIST-style IDX files and fake fan archives are written here.
"""

import collections
import gzip
import io
import os
import struct
import zipfile

import numpy as np
import pytest
import scipy.ndimage as ndi

from host.datasets import (DatasetError, fan_features, load_workload, parse_drift,
                           pool2, read_idx)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAN_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets", "cooling-fan"))

SPLITS = ("source_train", "source_test", "target_train", "target_test")
FAN_CLASSES = ("normal", "damage1", "damage2")
FAN_ENVS = ("silentA", "silentB", "noisy")


def need_fan_data():
    if not os.path.isdir(FAN_DATA):
        pytest.skip(f"cooling-fan data not found at {FAN_DATA}")
    return FAN_DATA


def key(img):
    """A hashable identity of an image (exact float values)."""
    return np.ascontiguousarray(img, dtype=np.float64).tobytes()


# ====================================================================== digits

@pytest.fixture(scope="module")
def digits_raw():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float64) / 16.0, d.target


@pytest.fixture(scope="module")
def digits():
    """Loads shared by the digits tests, keyed by drift spec."""
    return {spec: load_workload("digits", spec)
            for spec in ("none", "rotate:30", "shift:2", "shift:-1,3", "noise:0.1")}


def test_digits_split_sizes(digits):
    wl = digits["rotate:30"]
    assert [len(getattr(wl, s)) for s in SPLITS] == [862, 216, 359, 360]
    assert wl.classes == 10
    assert wl.name == "digits" and wl.drift == "rotate:30"
    assert wl.input_shape == (8, 8, 1)


@pytest.mark.parametrize("spec", ["none", "rotate:30", "noise:0.1"])
def test_digits_shapes_labels_and_range(digits, spec):
    wl = digits[spec]
    for s in SPLITS:
        sp = getattr(wl, s)
        assert sp.x.shape == (len(sp), 8, 8, 1), s
        assert sp.y.shape == (len(sp),), s
        assert np.issubdtype(sp.y.dtype, np.integer), s
        assert np.issubdtype(sp.x.dtype, np.floating), s
        # every split of >= 216 digits holds all ten classes, and nothing else
        assert set(np.unique(sp.y).tolist()) == set(range(10)), s
        assert sp.x.min() >= 0.0 and sp.x.max() <= 1.0, s
    # scaled by 16 (not by 255, not left at 0..16): the undrifted source reaches exactly 1.0
    assert wl.source_train.x.max() == 1.0


def test_digits_default_drift_is_rotate30(digits):
    wl = load_workload("digits")
    assert wl.drift == "rotate:30"
    np.testing.assert_array_equal(wl.target_test.x, digits["rotate:30"].target_test.x)


def test_digits_domains_partition_the_dataset(digits, digits_raw):
    """Every one of the 1797 digits is used exactly once, so no sample is in both
    domains; labels stay with their images through the shuffle. Compared on the
    undrifted ("none") load. sklearn's digits may in principle hold identical images,
    so an image seen in both domains is allowed only if the dataset holds it twice."""
    images, labels = digits_raw
    wl = digits["none"]
    original = collections.Counter(key(im) for im in images)
    label_of = {}
    for im, lb in zip(images, labels):
        label_of.setdefault(key(im), set()).add(int(lb))

    used = collections.Counter()
    for s in SPLITS:
        sp = getattr(wl, s)
        for im, lb in zip(sp.x[..., 0], sp.y):
            k = key(im)
            assert k in original, f"{s} holds an image that is not a digit of the dataset"
            assert int(lb) in label_of[k], f"{s}: label {lb} does not belong to its image"
            used[k] += 1
    assert used == original     # each sample once: nothing lost, nothing duplicated

    source = {key(im) for s in SPLITS[:2] for im in getattr(wl, s).x[..., 0]}
    target = {key(im) for s in SPLITS[2:] for im in getattr(wl, s).x[..., 0]}
    both = source & target
    assert all(original[k] >= 2 for k in both), "a unique image is in both domains"
    # the shuffle really happened: the splits are not the dataset's first rows in order
    assert not np.array_equal(wl.source_train.x[:20, ..., 0], images[:20])


def test_digits_splits_are_deterministic(digits):
    again = load_workload("digits", "rotate:30")
    first = digits["rotate:30"]
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(again, s).x, getattr(first, s).x, err_msg=s)
        np.testing.assert_array_equal(getattr(again, s).y, getattr(first, s).y, err_msg=s)


@pytest.mark.parametrize("spec", ["rotate:30", "shift:2", "shift:-1,3", "noise:0.1"])
def test_source_splits_are_never_drifted(digits, spec):
    base, wl = digits["none"], digits[spec]
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(wl, s).y, getattr(base, s).y, err_msg=s)
    for s in ("source_train", "source_test"):
        np.testing.assert_array_equal(getattr(wl, s).x, getattr(base, s).x, err_msg=s)
    for s in ("target_train", "target_test"):
        assert not np.array_equal(getattr(wl, s).x, getattr(base, s).x), f"{spec} left {s} unchanged"


def test_rotate_matches_scipy_on_undrifted_targets(digits):
    base, rot = digits["none"], digits["rotate:30"]
    for s in ("target_train", "target_test"):
        clean = getattr(base, s).x[..., 0]
        expected = np.stack([ndi.rotate(img, 30, reshape=False, order=1, mode="constant")
                             for img in clean])
        np.testing.assert_allclose(getattr(rot, s).x[..., 0], expected, rtol=0, atol=1e-12, err_msg=s)
        # the rotation changes most images, not just a few pixels
        changed = np.abs(getattr(rot, s).x[..., 0] - clean).max(axis=(1, 2)) > 0.1
        assert changed.mean() > 0.9, s


def test_negative_rotation(digits):
    """rotate:-30 is the other way round, not the same as rotate:30."""
    neg = load_workload("digits", "rotate:-30")
    clean = digits["none"].target_test.x[:5, ..., 0]
    expected = np.stack([ndi.rotate(img, -30, reshape=False, order=1, mode="constant") for img in clean])
    np.testing.assert_allclose(neg.target_test.x[:5, ..., 0], expected, atol=1e-12)
    assert not np.allclose(neg.target_test.x, digits["rotate:30"].target_test.x)


def _shift_zero_fill(img, dx, dy):
    """Hand-made: np.roll, then zero the pixels that wrapped round."""
    out = np.roll(img, (dy, dx), axis=(0, 1))
    if dy > 0:
        out[:dy, :] = 0
    elif dy < 0:
        out[dy:, :] = 0
    if dx > 0:
        out[:, :dx] = 0
    elif dx < 0:
        out[:, dx:] = 0
    return out


def test_shift_moves_pixels_right(digits):
    clean = digits["none"].target_train.x[..., 0]
    shifted = digits["shift:2"].target_train.x[..., 0]
    # one image by hand, written out: column c of the result is column c-2 of the input
    img = clean[0]
    manual = np.zeros_like(img)
    manual[:, 2:] = img[:, :-2]
    np.testing.assert_array_equal(shifted[0], manual)
    np.testing.assert_array_equal(shifted[0], _shift_zero_fill(img, 2, 0))
    # and every other target image the same way
    for i in range(len(clean)):
        np.testing.assert_array_equal(shifted[i], _shift_zero_fill(clean[i], 2, 0), err_msg=str(i))
    assert not np.array_equal(shifted, clean)


def test_shift_x_then_y(digits):
    """shift:<px>,<py>: px moves columns (x), py moves rows (y)."""
    clean = digits["none"].target_test.x[..., 0]
    shifted = digits["shift:-1,3"].target_test.x[..., 0]
    manual = np.zeros_like(clean[0])
    manual[3:, :-1] = clean[0][:-3, 1:]
    np.testing.assert_array_equal(shifted[0], manual)
    for i in range(len(clean)):
        np.testing.assert_array_equal(shifted[i], _shift_zero_fill(clean[i], -1, 3), err_msg=str(i))


def test_noise_is_deterministic_clipped_and_has_the_given_sigma(digits):
    noisy = digits["noise:0.1"]
    again = load_workload("digits", "noise:0.1")
    clean = digits["none"]
    for s in ("target_train", "target_test"):
        x = getattr(noisy, s).x
        np.testing.assert_array_equal(getattr(again, s).x, x, err_msg=s)
        assert x.min() >= 0.0 and x.max() <= 1.0, s
        # clipping happened (many background pixels are 0, half of them would go negative)
        assert (x == 0.0).mean() > 0.1, s
        # mid-grey pixels are far from the clip: there the noise has sigma ~0.1
        c = getattr(clean, s).x
        mid = (c > 0.3) & (c < 0.7)
        assert mid.sum() > 500
        sigma = (x - c)[mid].std()
        assert 0.08 < sigma < 0.12, (s, sigma)
    stronger = load_workload("digits", "noise:0.3")
    assert np.abs(stronger.target_test.x - clean.target_test.x).mean() > \
        np.abs(noisy.target_test.x - clean.target_test.x).mean()


def test_noise_zero_is_no_change(digits):
    wl = load_workload("digits", "noise:0")
    np.testing.assert_array_equal(wl.target_test.x, digits["none"].target_test.x)


# ====================================================================== drift specs

@pytest.mark.parametrize("spec, parsed", [
    ("rotate:-15", ("rotate", -15.0)),
    ("rotate:12.5", ("rotate", 12.5)),
    ("rotate:30", ("rotate", 30.0)),
    ("shift:2", ("shift", 2, 0)),
    ("shift:-1,3", ("shift", -1, 3)),
    ("noise:0.05", ("noise", 0.05)),
    ("none", ("none",)),
])
@pytest.mark.parametrize("workload", ["digits", "mnist"])
def test_parse_drift_accepts_image_specs(workload, spec, parsed):
    assert parse_drift(workload, spec) == parsed


@pytest.mark.parametrize("spec", ["", None, "rotate", "rotate:", "rotate:abc", "spin:3", "noise:-1",
                                  "env:noisy", "shift:1,2,3", "shift:1.5", " rotate:30", "rotate:30 ",
                                  "none:1", "NONE"])
@pytest.mark.parametrize("workload", ["digits", "mnist"])
def test_parse_drift_rejects_bad_image_specs(workload, spec):
    with pytest.raises(DatasetError):
        parse_drift(workload, spec)


@pytest.mark.parametrize("spec, env", [("env:noisy", "noisy"), ("env:silentB", "silentB")])
def test_parse_drift_accepts_fan_envs(spec, env):
    assert parse_drift("fan", spec) == ("env", env)


@pytest.mark.parametrize("spec", ["env:silentA", "env:foo", "rotate:30", "", None, "noisy", "env:",
                                  "env:noisy,silentB", "none"])
def test_parse_drift_rejects_bad_fan_specs(spec):
    with pytest.raises(DatasetError):
        parse_drift("fan", spec)


def test_error_messages_are_one_line():
    for call in (lambda: parse_drift("digits", "spin:3"), lambda: parse_drift("fan", "env:foo"),
                 lambda: load_workload("nope")):
        with pytest.raises(DatasetError) as e:
            call()
        assert str(e.value) and "\n" not in str(e.value)


def test_load_workload_rejects_bad_drift_and_unknown_workload():
    with pytest.raises(DatasetError, match="spin:3"):
        load_workload("digits", "spin:3")
    with pytest.raises(DatasetError, match="nope"):
        load_workload("nope", "rotate:30")
    with pytest.raises(DatasetError):
        load_workload("Digits")


# ====================================================================== fan (real data)

@pytest.fixture(scope="module")
def fan_noisy():
    return load_workload("fan", "env:noisy", data=need_fan_data())


@pytest.fixture(scope="module")
def fan_silentB():
    return load_workload("fan", "env:silentB", data=need_fan_data())


def _check_fan_workload(wl):
    assert wl.classes == 3
    sizes = [len(getattr(wl, s)) for s in SPLITS]
    assert sizes == [1128, 282, 423, 987]
    # 1410 per environment in each domain
    assert sizes[0] + sizes[1] == 1410 and sizes[2] + sizes[3] == 1410
    for s in SPLITS:
        sp = getattr(wl, s)
        assert sp.x.shape == (len(sp), 1, 256, 1), s
        assert np.isfinite(sp.x).all(), s
        assert np.issubdtype(sp.y.dtype, np.integer), s
        counts = np.bincount(sp.y, minlength=3)
        assert len(counts) == 3, s
        # balanced: each class's share is 1/3 +- 5 percentage points
        share = counts / len(sp)
        assert np.all(np.abs(share - 1 / 3) <= 0.05), (s, counts)


def test_fan_noisy_splits(fan_noisy):
    _check_fan_workload(fan_noisy)
    assert fan_noisy.drift == "env:noisy"
    assert fan_noisy.input_shape == (1, 256, 1)


def test_fan_silentB_splits(fan_silentB):
    _check_fan_workload(fan_silentB)


def test_fan_source_is_silentA_in_both_cases_and_targets_differ(fan_noisy, fan_silentB):
    for s in ("source_train", "source_test"):
        np.testing.assert_array_equal(getattr(fan_noisy, s).x, getattr(fan_silentB, s).x)
    assert not np.allclose(fan_noisy.target_test.x.mean(axis=0), fan_silentB.target_test.x.mean(axis=0))


def test_fan_default_drift_is_noisy(fan_noisy):
    wl = load_workload("fan", data=need_fan_data())
    assert wl.drift == "env:noisy"
    np.testing.assert_array_equal(wl.target_train.x, fan_noisy.target_train.x)


def test_fan_no_spectrum_in_two_splits(fan_noisy):
    for a, b in (("source_train", "source_test"), ("target_train", "target_test")):
        ka = {key(x) for x in getattr(fan_noisy, a).x}
        kb = {key(x) for x in getattr(fan_noisy, b).x}
        assert len(ka) > 0.95 * len(getattr(fan_noisy, a))     # spectra are (nearly) all distinct
        assert not ka & kb, (a, b)


def test_fan_parses_a_real_archive(fan_noisy):
    """One real CSV, parsed here by hand, is in the silentA source with its label."""
    path = os.path.join(need_fan_data(), "DATA", "12cm_hmlo_damage2_silentA_2.zip")
    if not os.path.isfile(path):
        path = os.path.join(need_fan_data(), "12cm_hmlo_damage2_silentA_2.zip")
    with zipfile.ZipFile(path) as z:
        member = sorted(m for m in z.namelist() if m.endswith(".csv"))[7]
        lines = z.read(member).decode().splitlines()
    mags = np.array([float(line.split(",")[1]) for line in lines if line.strip()])
    assert len(mags) == 512
    expected = _features_by_hand(mags)
    src = np.concatenate([fan_noisy.source_train.x, fan_noisy.source_test.x])[:, 0, :, 0]
    lab = np.concatenate([fan_noisy.source_train.y, fan_noisy.source_test.y])
    hits = np.flatnonzero(np.all(np.abs(src - expected) < 1e-12, axis=1))
    assert len(hits) == 1
    assert lab[hits[0]] == FAN_CLASSES.index("damage2")


# ====================================================================== fan_features

def _features_by_hand(spectrum):
    out = []
    for k in range(256):
        a = spectrum[2 * k + 1]
        b = spectrum[2 * k + 2] if 2 * k + 2 < 512 else 0.0      # bin 512 taken as 0
        out.append(np.log10((a + b) / 2 + 1e-3))
    return np.array(out)


def test_fan_features_formula():
    spectrum = np.arange(512, dtype=np.float64) * 0.01 + 0.5
    spectrum[0] = 123.0                         # bin 0 is not used
    f = fan_features(spectrum)
    assert f.shape == (256,)
    np.testing.assert_allclose(f, _features_by_hand(spectrum), rtol=0, atol=1e-12)
    # a few values written out
    assert f[0] == pytest.approx(np.log10((spectrum[1] + spectrum[2]) / 2 + 1e-3), abs=1e-12)
    assert f[1] == pytest.approx(np.log10((spectrum[3] + spectrum[4]) / 2 + 1e-3), abs=1e-12)
    assert f[255] == pytest.approx(np.log10(spectrum[511] / 2 + 1e-3), abs=1e-12)


def test_fan_features_of_zeros_and_bin0():
    assert np.allclose(fan_features(np.zeros(512)), -3.0)       # log10(1e-3)
    spec = np.zeros(512)
    spec[0] = 1e6
    assert np.allclose(fan_features(spec), -3.0)
    spec = np.zeros(512)
    spec[2] = 2.0                                                 # bins 1 and 2 -> feature 0
    f = fan_features(spec)
    assert f[0] == pytest.approx(np.log10(1.0 + 1e-3))
    assert np.allclose(f[1:], -3.0)


# ====================================================================== fan (fake archives)

FAKE_PER_ZIP = 2        # spectra per archive -> 12 per environment


def _fake_spectrum(cls, env, n, i):
    rng = np.random.default_rng([FAN_CLASSES.index(cls), FAN_ENVS.index(env), n, i])
    mags = rng.uniform(0.0, 2.0, 512) * (1 + FAN_CLASSES.index(cls))
    mags[0] = 0.0
    # what the CSV holds (6 decimals), and so what the loader can see
    return np.array([float(f"{v:.6f}") for v in mags])


def _csv(mags, newline="\n"):
    return newline.join(f"{b}, {v:.6f}" for b, v in enumerate(mags)) + newline


def make_fake_fan(folder, sub="DATA", per_zip=FAKE_PER_ZIP):
    """The 18 archives, with small well-formed CSVs; returns {env: [(features, label)]}."""
    base = os.path.join(folder, sub) if sub else folder
    os.makedirs(base, exist_ok=True)
    expected = {env: [] for env in FAN_ENVS}
    for label, cls in enumerate(FAN_CLASSES):
        for env in FAN_ENVS:
            for n in (1, 2):
                stem = f"12cm_hmlo_{cls}_{env}_{n}"
                with zipfile.ZipFile(os.path.join(base, stem + ".zip"), "w") as z:
                    z.writestr(stem + "/", b"")
                    for i in range(per_zip):
                        mags = _fake_spectrum(cls, env, n, i)
                        z.writestr(f"{stem}/2022-02-10-00-00-{i:02d}.csv", _csv(mags))
                        expected[env].append((_features_by_hand(mags), label))
    return expected


def _match(split_x, split_y, expected):
    """Each loaded spectrum equals exactly one written one, with its label; returns the
    indices of the written spectra used."""
    used = []
    for x, y in zip(split_x[:, 0, :, 0], split_y):
        hits = [j for j, (f, _) in enumerate(expected) if np.allclose(x, f, rtol=0, atol=1e-9)]
        assert len(hits) == 1
        assert y == expected[hits[0]][1]
        used.append(hits[0])
    return used


@pytest.mark.parametrize("sub", ["DATA", ""])
def test_fan_loader_parses_fake_archives(tmp_path, sub):
    expected = make_fake_fan(str(tmp_path), sub=sub)
    wl = load_workload("fan", "env:noisy", data=str(tmp_path))
    # 12 spectra per environment: int(12 * 0.8) = 9 / 3 and int(12 * 0.3) = 3 / 9
    assert [len(getattr(wl, s)) for s in SPLITS] == [9, 3, 3, 9]
    for s in SPLITS:
        assert getattr(wl, s).x.shape == (len(getattr(wl, s)), 1, 256, 1)
    src = _match(wl.source_train.x, wl.source_train.y, expected["silentA"]) + \
        _match(wl.source_test.x, wl.source_test.y, expected["silentA"])
    tgt = _match(wl.target_train.x, wl.target_train.y, expected["noisy"]) + \
        _match(wl.target_test.x, wl.target_test.y, expected["noisy"])
    assert sorted(src) == list(range(12))      # every silentA spectrum exactly once
    assert sorted(tgt) == list(range(12))      # every noisy spectrum exactly once
    wl_b = load_workload("fan", "env:silentB", data=str(tmp_path))
    tgt_b = _match(wl_b.target_test.x, wl_b.target_test.y, expected["silentB"])
    assert len(set(tgt_b)) == 9


def test_fan_loader_accepts_crlf(tmp_path):
    make_fake_fan(str(tmp_path))
    stem = "12cm_hmlo_normal_noisy_1"
    mags = _fake_spectrum("normal", "noisy", 1, 0)
    with zipfile.ZipFile(tmp_path / "DATA" / f"{stem}.zip", "w") as z:
        z.writestr(f"{stem}/a.csv", _csv(mags, "\r\n"))
    wl = load_workload("fan", "env:noisy", data=str(tmp_path))
    assert len(wl.target_train) + len(wl.target_test) == 11
    allx = np.concatenate([wl.target_train.x, wl.target_test.x])[:, 0, :, 0]
    assert np.any(np.all(np.abs(allx - _features_by_hand(mags)) < 1e-9, axis=1))


def test_fan_garbage_zip_raises(tmp_path):
    make_fake_fan(str(tmp_path))
    bad = tmp_path / "DATA" / "12cm_hmlo_damage1_noisy_2.zip"
    bad.write_bytes(b"this is not a zip file\x00\x01\x02" * 10)
    with pytest.raises(DatasetError, match="12cm_hmlo_damage1_noisy_2.zip"):
        load_workload("fan", "env:noisy", data=str(tmp_path))
    # the other target environment does not read that archive
    assert len(load_workload("fan", "env:silentB", data=str(tmp_path)).target_test) == 9


def test_fan_truncated_zip_raises(tmp_path):
    make_fake_fan(str(tmp_path))
    f = tmp_path / "DATA" / "12cm_hmlo_normal_silentA_1.zip"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DatasetError, match="12cm_hmlo_normal_silentA_1.zip"):
        load_workload("fan", "env:noisy", data=str(tmp_path))


@pytest.mark.parametrize("content", [b"0, 0.0\n1, abc\n", b"0, 1.0\n1, 2.0\n", b"\x00\xff garbage"])
def test_fan_bad_csv_raises(tmp_path, content):
    make_fake_fan(str(tmp_path))
    stem = "12cm_hmlo_damage2_noisy_1"
    with zipfile.ZipFile(tmp_path / "DATA" / f"{stem}.zip", "w") as z:
        z.writestr(f"{stem}/bad.csv", content)
    with pytest.raises(DatasetError, match=stem):
        load_workload("fan", "env:noisy", data=str(tmp_path))


def test_fan_csv_with_three_columns_raises(tmp_path):
    """512 lines of "bin, value, extra" are not a spectrum: the loader must not read
    them as pairs (1, 2), (3, 1), ... and go on with made-up magnitudes."""
    make_fake_fan(str(tmp_path))
    stem = "12cm_hmlo_damage2_noisy_1"
    with zipfile.ZipFile(tmp_path / "DATA" / f"{stem}.zip", "w") as z:
        z.writestr(f"{stem}/bad.csv", "".join(f"{b}, 0.5, 7\n" for b in range(512)))
    with pytest.raises(DatasetError, match=stem):
        load_workload("fan", "env:noisy", data=str(tmp_path))


@pytest.mark.parametrize("workload, drift", [("fan", "env:noisy"), ("mnist", "rotate:30")])
def test_missing_data_folder_is_named(tmp_path, workload, drift):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(DatasetError) as e:
        load_workload(workload, drift, data=missing)
    assert missing in str(e.value)


def test_fan_missing_archive(tmp_path):
    make_fake_fan(str(tmp_path))
    os.remove(tmp_path / "DATA" / "12cm_hmlo_damage2_noisy_2.zip")
    with pytest.raises(DatasetError, match="12cm_hmlo_damage2_noisy_2.zip"):
        load_workload("fan", "env:noisy", data=str(tmp_path))


# ====================================================================== mnist / IDX

def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path, array, gz=False):
    data = idx_bytes(array)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if gz else data)
    return str(path)


def mnist_arrays(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256          # make every image unique
    images[:, 0, 1] = np.arange(n) // 256 + seed
    labels = (np.arange(n) * 7 + seed) % 10
    return images, labels.astype(np.uint8)


def make_mnist(folder, n_train=70, n_test=30, gz=False, names=None):
    names = names or {"ti": "train-images-idx3-ubyte", "tl": "train-labels-idx1-ubyte",
                      "ei": "t10k-images-idx3-ubyte", "el": "t10k-labels-idx1-ubyte"}
    sfx = ".gz" if gz else ""
    ti, tl = mnist_arrays(n_train, 1)
    write_idx(os.path.join(folder, names["ti"] + sfx), ti, gz)
    write_idx(os.path.join(folder, names["tl"] + sfx), tl, gz)
    images, labels = [ti], [tl]
    if n_test:
        ei, el = mnist_arrays(n_test, 2)
        write_idx(os.path.join(folder, names["ei"] + sfx), ei, gz)
        write_idx(os.path.join(folder, names["el"] + sfx), el, gz)
        images.append(ei)
        labels.append(el)
    return np.concatenate(images), np.concatenate(labels)


def expected_sizes(n):
    n_src = int(n * 0.6)
    n_src_train = int(n_src * 0.8)
    n_tgt_train = (n - n_src) // 2
    return [n_src_train, n_src - n_src_train, n_tgt_train, n - n_src - n_tgt_train]


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    images, labels = mnist_arrays(13, 5)
    fi = write_idx(tmp_path / "im", images, gz)
    fl = write_idx(tmp_path / "lb", labels, gz)
    if gz:
        assert open(fi, "rb").read(2) == b"\x1f\x8b"
    got_i, got_l = read_idx(fi), read_idx(fl)
    assert got_i.dtype == np.uint8 and got_i.shape == (13, 28, 28)
    assert got_l.dtype == np.uint8 and got_l.shape == (13,)
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)


def test_read_idx_header_bytes(tmp_path):
    """The header is written out by hand: magic 0x00000803, then big-endian dims."""
    raw = struct.pack(">I", 0x00000803) + struct.pack(">3I", 2, 3, 4) + bytes(range(24))
    (tmp_path / "f").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "f")), np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    raw = struct.pack(">I", 0x00000801) + struct.pack(">I", 5) + bytes([9, 8, 7, 6, 5])
    (tmp_path / "g").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "g")), [9, 8, 7, 6, 5])


def test_expected_sizes_formula():
    assert expected_sizes(1797) == [862, 216, 359, 360]       # the documented digits numbers
    assert expected_sizes(100) == [48, 12, 20, 20]


def _pooled_key(x14):
    """An image's identity after 2x2 pooling: the exact sums of its 2x2 blocks."""
    sums = np.round(x14 * 1020.0)
    np.testing.assert_allclose(x14 * 1020.0, sums, atol=1e-9)   # mean of 4 bytes / 255
    return sums.astype(np.int64).tobytes()


def _mnist_index(images):
    return {_pooled_key(pool2(im[None] / 255.0)[0]): i for i, im in enumerate(images)}


def _check_mnist_splits(wl, images, labels, drift_none=None):
    n = len(labels)
    assert [len(getattr(wl, s)) for s in SPLITS] == expected_sizes(n)
    for s in SPLITS:
        sp = getattr(wl, s)
        assert sp.x.shape == (len(sp), 14, 14, 1), s
        assert sp.x.min() >= 0.0 and sp.x.max() <= 1.0, s
    # source images are the written bytes / 255 pooled 2x2, with their labels, each used once
    index = _mnist_index(images)
    used = []
    for s in ("source_train", "source_test") + (("target_train", "target_test") if drift_none else ()):
        sp = getattr(wl, s)
        for x, y in zip(sp.x[..., 0], sp.y):
            i = index[_pooled_key(x)]
            assert y == labels[i]
            used.append(i)
    assert len(used) == len(set(used))
    if drift_none:
        assert sorted(used) == list(range(n))


def test_pool2_is_the_2x2_mean():
    img = np.arange(16, dtype=float).reshape(1, 4, 4)
    np.testing.assert_array_equal(pool2(img)[0], [[2.5, 4.5], [10.5, 12.5]])


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads_idx_folder(tmp_path, gz):
    images, labels = make_mnist(str(tmp_path), 70, 30, gz=gz)
    rot = load_workload("mnist", "rotate:30", data=str(tmp_path))
    assert rot.classes == 10 and rot.name == "mnist" and rot.input_shape == (14, 14, 1)
    assert [len(getattr(rot, s)) for s in SPLITS] == [48, 12, 20, 20]
    _check_mnist_splits(rot, images, labels)
    none = load_workload("mnist", "none", data=str(tmp_path))
    _check_mnist_splits(none, images, labels, drift_none=True)
    for s in ("target_train", "target_test"):
        # drift at 28x28, then pool: rotate the written image the undrifted split holds
        index = _mnist_index(images)
        raw = [images[index[_pooled_key(x)]] / 255.0 for x in getattr(none, s).x[..., 0]]
        expected = pool2(np.stack([ndi.rotate(img, 30, reshape=False, order=1, mode="constant")
                                   for img in raw]))
        np.testing.assert_allclose(getattr(rot, s).x[..., 0], expected, atol=1e-12)
        np.testing.assert_array_equal(getattr(rot, s).y, getattr(none, s).y)


def test_mnist_train_only_other_names_and_odd_size(tmp_path):
    names = {"ti": "train-images.idx3-ubyte", "tl": "train-labels.idx1-ubyte", "ei": "", "el": ""}
    images, labels = make_mnist(str(tmp_path), 57, 0, gz=True, names=names)
    wl = load_workload("mnist", "shift:1", data=str(tmp_path))
    assert [len(getattr(wl, s)) for s in SPLITS] == expected_sizes(57) == [27, 7, 11, 12]
    _check_mnist_splits(wl, images, labels)


def test_mnist_is_deterministic(tmp_path):
    make_mnist(str(tmp_path), 40, 10)
    a = load_workload("mnist", "noise:0.2", data=str(tmp_path))
    b = load_workload("mnist", "noise:0.2", data=str(tmp_path))
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(a, s).x, getattr(b, s).x)
        np.testing.assert_array_equal(getattr(a, s).y, getattr(b, s).y)


def _good_gzip():
    return gzip.compress(idx_bytes(mnist_arrays(4, 0)[0]))


CORRUPT_IDX = {
    "bad magic (type byte)": struct.pack(">I3I", 0x00000903, 1, 28, 28) + bytes(784),
    "bad magic (first byte)": struct.pack(">I3I", 0x01000803, 1, 28, 28) + bytes(784),
    "too short for a magic": b"\x00\x00",
    "empty file": b"",
    "truncated header": struct.pack(">I", 0x00000803) + struct.pack(">2I", 1, 28),
    "zero dimensions": struct.pack(">I", 0x00000800),
    "data length mismatch (short)": struct.pack(">I3I", 0x00000803, 5, 28, 28) + bytes(4 * 784),
    "data length mismatch (long)": struct.pack(">I3I", 0x00000803, 1, 28, 28) + bytes(785),
    "bad gzip (garbage after magic)": b"\x1f\x8b" + b"this is not gzip data" * 4,
    "bad gzip (truncated stream)": _good_gzip()[:-20],
    "bad gzip (corrupted deflate data)": (lambda g: g[:12] + bytes(b ^ 0xFF for b in g[12:-8]) + g[-8:])(_good_gzip()),
    "gzip of a non-IDX file": gzip.compress(b"hello, world\n" * 10),
}


@pytest.mark.parametrize("case", list(CORRUPT_IDX))
def test_read_idx_corrupt(tmp_path, case):
    f = tmp_path / "f"
    f.write_bytes(CORRUPT_IDX[case])
    with pytest.raises(DatasetError, match="corrupt IDX") as e:
        read_idx(str(f))
    assert str(f) in str(e.value)


@pytest.mark.parametrize("case", ["bad magic (type byte)", "truncated header", "data length mismatch (short)",
                                  "bad gzip (garbage after magic)", "bad gzip (corrupted deflate data)"])
def test_mnist_corrupt_file_in_folder(tmp_path, case):
    make_mnist(str(tmp_path), 20, 10)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(CORRUPT_IDX[case])
    with pytest.raises(DatasetError, match="corrupt IDX"):
        load_workload("mnist", "rotate:30", data=str(tmp_path))


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError):
        read_idx(str(tmp_path / "nothing"))


def test_mnist_needs_data():
    with pytest.raises(DatasetError, match="--data"):
        load_workload("mnist", "rotate:30")
    with pytest.raises(DatasetError, match="--data"):
        load_workload("mnist", "rotate:30", data="")


def test_mnist_folder_without_train_files(tmp_path):
    ei, el = mnist_arrays(10, 0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", ei)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", el)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_workload("mnist", "rotate:30", data=str(tmp_path))


def test_mnist_images_and_labels_disagree(tmp_path):
    make_mnist(str(tmp_path), 20, 0)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(DatasetError):
        load_workload("mnist", "rotate:30", data=str(tmp_path))


def test_mnist_labels_beyond_nine(tmp_path):
    make_mnist(str(tmp_path), 20, 0)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(20, 10, np.uint8))
    with pytest.raises(DatasetError):
        load_workload("mnist", "rotate:30", data=str(tmp_path))


def test_mnist_empty_files(tmp_path):
    """Well-formed IDX files holding zero images are a user error, not a crash."""
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((0,), np.uint8))
    with pytest.raises(DatasetError):
        load_workload("mnist", "rotate:30", data=str(tmp_path))


def test_mnist_bad_drift_spec(tmp_path):
    make_mnist(str(tmp_path), 20, 0)
    with pytest.raises(DatasetError):
        load_workload("mnist", "env:noisy", data=str(tmp_path))
