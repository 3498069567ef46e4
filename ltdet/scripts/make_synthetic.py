"""Generate the synthetic long-tailed detection data set (LVIS v1 format) and print its classes.

    python tools/make_synthetic.py                              # data/generated/synthetic, seed 0
    python tools/make_synthetic.py --root /tmp/syn --seed 1 --set num_train=300 image_size=128

Idempotent: a finished set with the same parameters is reused (pass --force to rebuild it).
See docs/synthetic.md for what the data set is. (`python -m ltdet.scripts.make_synthetic` is the
same command.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import yaml

from ltdet.data.synthetic import MARKER_NAME, make_synthetic_lvis


def parse_sizes(items: Sequence[str]) -> dict:
    """`key=value` pairs (values parsed as YAML: 300 -> int, 1.5 -> float) -> dict."""
    sizes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. num_train=300")
        sizes[key] = yaml.safe_load(value)
    return sizes


def class_table(train_json: str | Path) -> str:
    """Text table of the categories: id, name, frequency group, training images / instances."""
    with open(train_json, encoding="utf-8") as f:
        cats = json.load(f)["categories"]
    cats = sorted(cats, key=lambda c: -c["image_count"])
    lines = [f"{'id':>3}  {'class':<28} {'group':<5} {'train imgs':>10} {'train inst':>10}"]
    lines += [
        f"{c['id']:>3}  {c['name']:<28} {c['frequency']:<5} {c['image_count']:>10} "
        f"{c['instance_count']:>10}"
        for c in cats
    ]
    groups = Counter(c["frequency"] for c in cats)
    lines.append(
        f"groups: f {groups['f']}, c {groups['c']}, r {groups['r']} "
        f"(LVIS thresholds on training images: r <= 10 < c <= 100 < f)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/generated/synthetic", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="generator parameters (see ltdet.data.synthetic.make_synthetic_lvis)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a finished set exists")
    args = p.parse_args(argv)
    sizes = parse_sizes(args.set)
    if args.force:
        (Path(args.root) / MARKER_NAME).unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        out = make_synthetic_lvis(args.root, seed=args.seed, **sizes)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(class_table(out["train_json"]))
    for key, value in out.items():
        print(f"{key}: {value}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
