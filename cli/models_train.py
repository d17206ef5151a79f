"""`customs-edge models train wood|insects --images DIR [--out DIR]`: fit an image classifier on a folder
tree DIR/<label>/*.jpg; each label's regulatory status from DIR/labels.json or else the shipped model's
(a label in neither is refused); writes OUT/<kind>.onnx and its manifest, ready to be named in a
handheld's config (bring your own model; docs/handheld-models.md)."""

from __future__ import annotations

import argparse


def register(msub: argparse._SubParsersAction) -> None:
    t = msub.add_parser("train", help="train an image classifier on DIR/<label>/*.jpg (wood, insects)",
                        description=__doc__)
    t.add_argument("name", choices=["wood", "insects"], help="what the photographs show")
    t.add_argument("--images", required=True,
                   help="DIR/<label>/*.jpg (+ DIR/labels.json for labels the shipped model lacks)")
    t.add_argument("--out", default=None, help="output folder (default ./<name>-model)")
    t.add_argument("--seed", type=int, default=0, help="validation split and network seed")
    t.add_argument("--head", choices=["mlp", "logreg"], default="mlp", help="classifier head (default mlp)")
    t.add_argument("--min-confidence", type=float, default=0.6, help="abstain below this probability")
    t.set_defaults(fn=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from customs_edge.training.image_classifier import train

    train(args.name, args.images, args.out or f"{args.name}-model", seed=args.seed, head=args.head,
          min_confidence=args.min_confidence)
    return 0
