"""Train, quantize and save a workload's base model, deterministically.

    python scripts/pretrain.py digits            # writes host/models/digits.npz
    python scripts/pretrain.py fan --data PATH   # writes host/models/fan.npz
    python scripts/pretrain.py mnist --data PATH --out mnist.npz

Training is float Adam from He initialization with fixed seeds on the source-domain
pretraining split only; quantization is post-training with power-of-two scales
(`sim.qmodel.quantize_network`). The same command gives the same file.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateware.config import DEFAULT  # noqa: E402
from host.datasets import load_workload, DatasetError  # noqa: E402
from host.models import architecture, model_path  # noqa: E402
from sim.baselines import pretrain  # noqa: E402
from sim.finetune import evaluate_fixed, evaluate_float  # noqa: E402
from sim.qmodel import quantize_network, save_model  # noqa: E402

# epochs, batch, Adam learning rate, seed: chosen once, recorded in the model's meta
RECIPES = {
    "digits": dict(epochs=60, batch=32, lr=3e-3, seed=1),
    "fan": dict(epochs=60, batch=32, lr=1e-3, seed=1),
    "mnist": dict(epochs=5, batch=64, lr=2e-3, seed=1),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=sorted(RECIPES))
    ap.add_argument("--data", help="dataset folder (fan, mnist)")
    ap.add_argument("--out", help="output .npz (default: host/models/<workload>.npz)")
    args = ap.parse_args(argv)
    try:
        wl = load_workload(args.workload, data=args.data)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recipe = RECIPES[args.workload]
    layers = architecture(args.workload, wl.input_shape, wl.classes)
    src = wl.source_train
    params = pretrain(layers, src.x, src.y, recipe["epochs"], recipe["batch"], recipe["lr"], recipe["seed"],
                      progress=lambda d, t: print(f"\r  epoch {d}/{t}", end="", file=sys.stderr))
    print(file=sys.stderr)
    model = quantize_network(args.workload, layers, params, src.x, DEFAULT, wl.classes,
                             meta={"recipe": recipe})
    acc = {}
    for split in ("source_test", "target_test"):
        s = getattr(wl, split)
        acc[f"{split}_float"] = round(evaluate_float(model, None, s.x, s.y), 4)
        acc[f"{split}_fixed"] = round(evaluate_fixed(model, None, s.x, s.y, DEFAULT), 4)
    model.meta["accuracy"] = acc
    model.meta["target_drift"] = wl.drift
    out = args.out or model_path(args.workload)
    save_model(model, out)
    print(json.dumps({"model": out, "macs": model.macs, "s_x": model.s_x, "s_w": model.s_w,
                      "s_y": model.s_y, **acc}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
