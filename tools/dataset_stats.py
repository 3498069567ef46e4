#!/usr/bin/env python
"""Per-class statistics of an LVIS / COCO json: what repeat-factor sampling will do to it.

    python tools/dataset_stats.py lvis_v1_train.json [--threshold 0.001] [--plot stats.png]

Prints a table (per class: label, category id, name, r/c/f group, training images, instances,
repeat factor r_c), the r/c/f and AP1..AP4 bin sizes, the distribution of per-image repeat
factors and the expected epoch length under RFS (sum of r_img), and writes a plot (PNG).
"""

import argparse
import os

import numpy as np

from ltdet.data.class_stats import ClassStats, FlatAnnotations
from ltdet.data.coco_lt import bin_sizes
from ltdet.data.samplers import class_repeat_factors, repeat_factors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json")
    p.add_argument("--threshold", type=float, default=1e-3, help="RFS threshold t (default 1e-3)")
    p.add_argument(
        "--plot", default=None, help="PNG path (default: JSON name with _stats.png next to it)"
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=0,
        help="print only the N rarest and N most frequent classes (0 = all)",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop annotations with zero/negative width or height instead of failing",
    )
    args = p.parse_args(argv)

    flat = FlatAnnotations.from_json(args.json, skip_invalid=args.skip_invalid)
    stats = ClassStats.from_flat(flat)
    img_rf = repeat_factors(flat, threshold=args.threshold).numpy()
    n_img = stats.image_count.numpy()
    n_inst = stats.instance_count.numpy()
    class_rf = class_repeat_factors(flat, threshold=args.threshold).numpy()

    order = np.argsort(-n_inst, kind="stable")
    rows = order
    if args.max_rows and 2 * args.max_rows < len(order):
        rows = np.concatenate([order[: args.max_rows], order[-args.max_rows :]])
    print(
        f"{'label':>5} {'cat_id':>7} {'name':<28} {'grp':>3} {'images':>8} {'instances':>10}"
        f" {'r_c':>7}"
    )
    for i in rows:
        print(
            f"{i + 1:>5} {stats.cat_ids[i]:>7} {stats.names[i][:28]:<28} "
            f"{stats.frequency[i]:>3} {n_img[i]:>8.0f} {n_inst[i]:>10.0f} {class_rf[i]:>7.2f}"
        )
    freq = np.asarray(stats.frequency)
    print(
        f"\n{stats.num_images} images, {len(flat.ann_ids)} annotations (non-crowd), "
        f"{stats.num_classes} classes ({int((n_img == 0).sum())} without images)"
    )
    print(
        "frequency groups: "
        + " ".join(f"{g}={int((freq == g).sum())}" for g in "rcf")
        + (
            "  (from the json's 'frequency' field)"
            if flat.frequency
            else "  (from image counts: r 1-10, c 11-100, f > 100)"
        )
    )
    print("AP bins by instances: " + " ".join(f"{k}={v}" for k, v in bin_sizes(n_inst).items()))
    q = np.quantile(img_rf, [0.0, 0.5, 0.9, 0.99, 1.0])
    print(
        f"repeat factors (t={args.threshold:g}): images with r > 1: "
        f"{int((img_rf > 1).sum())} ({(img_rf > 1).mean():.1%}); min/median/p90/p99/max "
        + "/".join(f"{v:.2f}" for v in q)
    )
    print(
        f"expected RFS epoch length: {img_rf.sum():.0f} images "
        f"({img_rf.sum() / stats.num_images:.3f} x the data set)"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = args.plot or os.path.splitext(args.json)[0] + "_stats.png"
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}
    ranks = np.arange(1, len(order) + 1)
    for g in "rcf":
        m = freq[order] == g
        ax0.scatter(
            ranks[m],
            np.maximum(n_inst[order][m], 0.5),
            s=6,
            c=colours[g],
            label=f"{g} ({int(m.sum())})",
        )
    ax0.set_yscale("log")
    ax0.set_xlabel("class rank (by instances)")
    ax0.set_ylabel("training instances")
    ax0.set_title("per-class instances")
    ax0.legend()
    ax1.hist(img_rf, bins=50, log=True, color="tab:green")
    ax1.set_xlabel("image repeat factor r_img")
    ax1.set_ylabel("images")
    ax1.set_title(f"RFS t={args.threshold:g}: epoch {img_rf.sum():.0f} vs {stats.num_images}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
