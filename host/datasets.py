"""Workloads: data, splits and drift. ../shared/WORKLOADS.md is the source of truth.

`load_workload(name, drift, data=None)` returns a `Workload` whose four splits hold float
inputs (the network's input tensor, channels-last) and integer labels. Every problem
with the user's input raises `DatasetError` with a one-line message.
"""

import dataclasses
import gzip
import io
import os
import re
import struct
import zipfile
import zlib

import numpy as np

__all__ = ["DatasetError", "Split", "Workload", "WORKLOADS", "DEFAULT_DRIFT",
           "parse_drift", "load_workload", "read_idx", "default_fan_path", "pool2"]

SPLIT_SEED = 0          # one shuffle, fixed forever: the splits never change between runs
WORKLOADS = ("digits", "fan", "mnist")
DEFAULT_DRIFT = {"digits": "rotate:30", "fan": "env:noisy", "mnist": "rotate:30"}
FAN_ENVS = ("silentA", "silentB", "noisy")
FAN_CLASSES = ("normal", "damage1", "damage2")
FAN_BINS = 256


class DatasetError(Exception):
    """A problem with a workload, a drift spec or a data file (one-line message)."""


@dataclasses.dataclass
class Split:
    x: np.ndarray        # (N, H, W, C) float
    y: np.ndarray        # (N,) int

    def __len__(self):
        return len(self.y)


@dataclasses.dataclass
class Workload:
    name: str
    drift: str
    classes: int
    source_train: Split
    source_test: Split
    target_train: Split
    target_test: Split

    @property
    def input_shape(self):
        return self.source_train.x.shape[1:]


# ---------------------------------------------------------------- drift specs

_IMAGE_DRIFT = re.compile(r"^(rotate|noise):(-?\d+(?:\.\d+)?)$|^shift:(-?\d+)(?:,(-?\d+))?$|^none$")


def parse_drift(workload, spec):
    """Validate a drift spec; returns a normalized (kind, args) tuple."""
    if workload == "fan":
        m = re.fullmatch(r"env:(\w+)", spec or "")
        if not m or m.group(1) not in FAN_ENVS or m.group(1) == "silentA":
            raise DatasetError(
                f"bad drift spec {spec!r} for fan: use env:noisy or env:silentB "
                "(the base model is trained on silentA)")
        return ("env", m.group(1))
    m = _IMAGE_DRIFT.fullmatch(spec or "")
    if not m:
        raise DatasetError(
            f"bad drift spec {spec!r}: use rotate:<deg>, shift:<px>[,<py>], noise:<sigma> or none")
    if spec == "none":
        return ("none",)
    if m.group(1):
        value = float(m.group(2))
        if m.group(1) == "noise" and value < 0:
            raise DatasetError(f"bad drift spec {spec!r}: sigma must be >= 0")
        return (m.group(1), value)
    return ("shift", int(m.group(3)), int(m.group(4) or 0))


def apply_image_drift(images, drift, seed=SPLIT_SEED):
    """Apply a parsed image drift to (N, H, W) images in [0, 1]."""
    import scipy.ndimage as ndi
    kind = drift[0]
    if kind == "none":
        return images.copy()
    if kind == "rotate":
        return np.stack([ndi.rotate(img, drift[1], reshape=False, order=1, mode="constant")
                         for img in images])
    if kind == "shift":
        dx, dy = drift[1], drift[2]
        return np.stack([ndi.shift(img, (dy, dx), order=0, mode="constant") for img in images])
    rng = np.random.default_rng(seed + 1)
    return np.clip(images + rng.normal(0.0, drift[1], images.shape), 0.0, 1.0)


def _split_image_domains(images, labels, drift, seed=SPLIT_SEED):
    """60 % source (80/20 pretrain/test), 40 % target (50/50 fine-tune/test)."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    images, labels = images[order], labels[order]
    n_src = int(n * 0.6)
    n_src_train = int(n_src * 0.8)
    n_tgt_train = (n - n_src) // 2
    tgt = apply_image_drift(images[n_src:], drift, seed)
    as_split = lambda x, y: Split(x[..., None].astype(np.float64), y.astype(np.int64))
    return (as_split(images[:n_src_train], labels[:n_src_train]),
            as_split(images[n_src_train:n_src], labels[n_src_train:n_src]),
            as_split(tgt[:n_tgt_train], labels[n_src:n_src + n_tgt_train]),
            as_split(tgt[n_tgt_train:], labels[n_src + n_tgt_train:]))


# ---------------------------------------------------------------- digits

def _load_digits(drift):
    from sklearn.datasets import load_digits
    d = load_digits()
    images = d.images.astype(np.float64) / 16.0
    return _split_image_domains(images, d.target, drift)


# ---------------------------------------------------------------- fan

def default_fan_path():
    """../shared/datasets/cooling-fan beside the repository, if it is there."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.normpath(os.path.join(root, "..", "shared", "datasets", "cooling-fan"))


def _fan_archive(path, cls, env, n):
    for base in (os.path.join(path, "DATA"), path):
        f = os.path.join(base, f"12cm_hmlo_{cls}_{env}_{n}.zip")
        if os.path.isfile(f):
            return f
    raise DatasetError(f"fan data not found: no 12cm_hmlo_{cls}_{env}_{n}.zip in {path} "
                       "(pass --data with the cooling-fan folder)")


def fan_features(spectrum):
    """512 magnitudes (bin 0..511) -> 256 log-scaled features: bins 1..512 averaged in
    pairs (bin 512 is taken as 0), then log10(m + 1e-3)."""
    m = np.concatenate([spectrum[1:], [0.0]]).reshape(FAN_BINS, 2).mean(axis=1)
    return np.log10(m + 1e-3)


def _read_spectrum(data, where):
    """One CSV of 512 lines ``bin, magnitude`` -> the 512 magnitudes."""
    lines = data.strip().splitlines()
    try:
        rows = [line.split(b",") for line in lines]
        if len(rows) != 512 or any(len(r) != 2 for r in rows):
            raise ValueError(f"expected 512 lines of 'bin, magnitude', got {len(rows)} lines")
        vals = np.array(rows, dtype=np.float64)
    except ValueError as e:
        raise DatasetError(f"corrupt fan spectrum {where}: {e}") from None
    if not np.isfinite(vals).all():
        raise DatasetError(f"corrupt fan spectrum {where}: values that are not finite")
    return vals[:, 1]


def _load_fan_env(path, env):
    xs, ys = [], []
    for label, cls in enumerate(FAN_CLASSES):
        for n in (1, 2):
            name = _fan_archive(path, cls, env, n)
            try:
                with zipfile.ZipFile(name) as z:
                    members = sorted(m for m in z.namelist() if m.endswith(".csv"))
                    for m in members:
                        xs.append(fan_features(_read_spectrum(z.read(m), f"{name}:{m}")))
                        ys.append(label)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
                raise DatasetError(f"corrupt fan archive {name}: {e}") from None
    return np.array(xs), np.array(ys, dtype=np.int64)


def _load_fan(drift, path):
    path = path or default_fan_path()
    if not os.path.isdir(path):
        raise DatasetError(f"fan data folder not found: {path} (pass --data with the cooling-fan folder)")
    sx, sy = _load_fan_env(path, "silentA")
    tx, ty = _load_fan_env(path, drift[1])
    rng = np.random.default_rng(SPLIT_SEED)
    so, to = rng.permutation(len(sy)), rng.permutation(len(ty))
    sx, sy, tx, ty = sx[so], sy[so], tx[to], ty[to]
    ns = int(len(sy) * 0.8)
    nt = int(len(ty) * 0.3)
    as_split = lambda x, y: Split(x[:, None, :, None], y)
    return (as_split(sx[:ns], sy[:ns]), as_split(sx[ns:], sy[ns:]),
            as_split(tx[:nt], ty[:nt]), as_split(tx[nt:], ty[nt:]))


# ---------------------------------------------------------------- mnist (IDX files)

_IDX_TYPES = {0x08: np.uint8}


def read_idx(filename):
    """Read an IDX file (raw or gzip) of unsigned bytes; returns an ndarray."""
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DatasetError(f"cannot read {filename}: {e.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"corrupt IDX file {filename}: bad gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"corrupt IDX file {filename}: bad magic number")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"corrupt IDX file {filename}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = int(np.prod(dims))
    if count == 0:
        raise DatasetError(f"corrupt IDX file {filename}: it holds no data (dimensions {dims})")
    body = raw[4 + 4 * ndim:]
    if len(body) != count:
        raise DatasetError(f"corrupt IDX file {filename}: header says {count} bytes of data, "
                           f"file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def pool2(images):
    """2x2 mean of (N, H, W) images (H, W even): MNIST's 28x28 becomes 14x14, so that a
    sample's adapter inputs fit the activation cache (docs/models.md)."""
    n, h, w = images.shape
    return images.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def _find(path, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return f
    return None


def _load_mnist(drift, path):
    if not path:
        raise DatasetError("mnist needs --data PATH: a folder with the IDX files "
                           "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz])")
    if not os.path.isdir(path):
        raise DatasetError(f"mnist data folder not found: {path}")
    images, labels = [], []
    for prefix in ("train", "t10k"):
        fi, fl = _find(path, f"{prefix}-images-idx3-ubyte"), _find(path, f"{prefix}-labels-idx1-ubyte")
        if fi is None or fl is None:
            if prefix == "train":
                raise DatasetError(f"no train-images-idx3-ubyte / train-labels-idx1-ubyte in {path}")
            continue
        im, lb = read_idx(fi), read_idx(fl)
        if im.ndim != 3 or lb.ndim != 1 or len(im) != len(lb):
            raise DatasetError(f"IDX files in {path} disagree: {im.shape} images, {lb.shape} labels")
        images.append(im)
        labels.append(lb)
    images = np.concatenate(images).astype(np.float64) / 255.0
    labels = np.concatenate(labels).astype(np.int64)
    if labels.max() >= 10:
        raise DatasetError(f"labels in {path} go beyond 9")
    if images.shape[1] % 2 or images.shape[2] % 2:
        raise DatasetError(f"images in {path} are {images.shape[1]}x{images.shape[2]}; mnist needs even sizes")
    # drift at full resolution, then pool: the drift acts on the images as recorded
    return tuple(Split(pool2(s.x[..., 0])[..., None], s.y) for s in _split_image_domains(images, labels, drift))


# ---------------------------------------------------------------- entry point

def load_workload(name, drift=None, data=None):
    if name not in WORKLOADS:
        raise DatasetError(f"unknown workload {name!r}: choose one of {', '.join(WORKLOADS)}")
    drift = drift or DEFAULT_DRIFT[name]
    parsed = parse_drift(name, drift)
    if name == "digits":
        splits, classes = _load_digits(parsed), 10
    elif name == "fan":
        splits, classes = _load_fan(parsed, data), 3
    else:
        splits, classes = _load_mnist(parsed, data), 10
    return Workload(name, drift, classes, *splits)
