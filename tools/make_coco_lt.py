#!/usr/bin/env python
"""Write a long-tailed subset of a COCO-format json (COCO-LT), keeping whole images.

    python tools/make_coco_lt.py instances_train2017.json --out coco_lt_train.json --imbalance 100
    python tools/make_coco_lt.py instances_train2017.json --out coco_lt_train.json \
        --profile lvis_v1_train.json --seed 0

Prints the subset's size, its r/c/f group sizes (LVIS thresholds on training images) and its
AP1..AP4 bin sizes (training instances [1, 20), [20, 400), [400, 8000), [8000, inf)).
"""

import argparse
import json

import numpy as np

from ltdet.data.class_stats import ClassStats, load_json_dict
from ltdet.data.coco_lt import build_coco_lt
from ltdet.fileio import atomic_write


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", help="source COCO-format json (e.g. instances_train2017.json)")
    p.add_argument("--out", required=True, help="output json path")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--imbalance",
        type=float,
        default=100.0,
        help="Zipf profile with max/min instance ratio (default 100)",
    )
    group.add_argument(
        "--profile",
        help="imitate the sorted class instance counts of this json (e.g. lvis_v1_train.json)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop boxes with zero/negative width or height instead of failing",
    )
    args = p.parse_args(argv)

    data, path = load_json_dict(args.json)
    profile = None
    if args.profile:
        profile = ClassStats.from_json(
            args.profile, skip_invalid=args.skip_invalid
        ).instance_count.numpy()
    out, s = build_coco_lt(
        data,
        imbalance=args.imbalance,
        profile=profile,
        seed=args.seed,
        json_path=path,
        skip_invalid=args.skip_invalid,
    )
    atomic_write(args.out, lambda f: json.dump(out, f), text=True)

    target, achieved = s["target"], s["achieved"]
    ok = target > 0
    log_err = np.abs(np.log((achieved[ok] + 1) / (target[ok] + 1)))
    print(
        f"wrote {args.out}: {s['num_images']} of {len(data['images'])} images, "
        f"{s['num_instances']} instances, {len(target)} classes "
        f"({s['empty_classes']} without instances)"
    )
    profile = f"--profile {args.profile}" if args.profile else f"Zipf, imbalance {args.imbalance:g}"
    print(
        f"profile: {profile}, seed {args.seed}; achieved max/min instances {achieved.max():.0f}/"
        f"{max(achieved[achieved > 0].min(), 1):.0f}; median |log(achieved/target)| "
        f"{np.median(log_err):.3f}"
    )
    f = s["frequency_sizes"]
    print(
        f"frequency groups (training images r: 1-10, c: 11-100, f: >100): "
        f"r={f['r'] - s['empty_classes']} c={f['c']} f={f['f']}"
    )
    b = s["bin_sizes"]
    print(
        "AP bins (training instances [1,20) [20,400) [400,8000) [8000,inf)): "
        + " ".join(f"{k}={v}" for k, v in b.items())
    )


if __name__ == "__main__":
    main()
