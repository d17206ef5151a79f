"""Rebuild shipped models: python -m customs_edge.training.train NAME|all [--seed N] [--golden-only]."""

from __future__ import annotations

import argparse
import importlib

from customs_edge.models import MODELS_DIR
from customs_edge.training import MODELS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name", choices=[*MODELS, "all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optics", help="fever only: the camera's optics (mlx90640, lepton35, ir384); "
                                    "writes models/fever_<optics>/ for any but the MLX90640")
    p.add_argument("--golden-only", action="store_true",
                   help="keep the model, (re)write only its manifest's golden set (inputs, true outputs, minimum "
                        "accuracy) from freshly simulated data")
    args = p.parse_args()
    for name in MODELS if args.name == "all" else [args.name]:
        module = MODELS[name].partition(":")[0]
        mod = importlib.import_module(module)
        out = MODELS_DIR / module.rpartition(".")[2]
        kw = {}
        if args.optics and name == "fever":
            optics = mod.optics_named(args.optics)
            out, kw = MODELS_DIR / mod.model_dir_name(optics), {"optics": optics}
        if args.golden_only and not hasattr(mod, "write_golden"):
            print(f"{name}: no golden set writer yet (image classifiers): a pushed version of it is refused at its "
                  "self-test")
            continue
        if args.golden_only:
            golden = mod.write_golden(out / "manifest.json", seed=args.seed, **kw)
            print(f"{name}: golden set of {len(next(iter(golden['expected'].values())))} rows, min_accuracy "
                  f"{golden['min_accuracy']} written to {out / 'manifest.json'}")
            continue
        path = mod.train(out, seed=args.seed, **kw)
        print(f"{name}: wrote {path}")


if __name__ == "__main__":
    main()
