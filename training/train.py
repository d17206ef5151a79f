"""Rebuild shipped models: python -m customs_edge.training.train NAME|all [--seed N]."""

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
    args = p.parse_args()
    for name in MODELS if args.name == "all" else [args.name]:
        module = MODELS[name].partition(":")[0]
        mod = importlib.import_module(module)
        out = MODELS_DIR / module.rpartition(".")[2]
        if args.optics and name == "fever":
            optics = mod.optics_named(args.optics)
            path = mod.train(MODELS_DIR / mod.model_dir_name(optics), seed=args.seed, optics=optics)
        else:
            path = mod.train(out, seed=args.seed)
        print(f"{name}: wrote {path}")


if __name__ == "__main__":
    main()
