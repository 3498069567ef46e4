"""Speed / memory / agreement of ltdet's LVIS evaluator against the official `lvis` package and
faster-coco-eval (LVIS mode), each in its own subprocess on the same generated files.

    python benchmarks/eval_speed.py --images 500            # quick
    python benchmarks/eval_speed.py --images 5000           # the acceptance run (~13 GB for peers)
    python benchmarks/eval_speed.py --images 19809 --only ltdet
    python benchmarks/eval_speed.py --images 5000 --iou-type segm    # mask AP

The generated set is LVIS v1-like: 1203 classes (337 r / 461 c / 405 f), about 12 boxes per image
(~58% small), `neg_category_ids` and `not_exhaustive_category_ids` on every image, a 8-number
polygon per box (real LVIS json carries polygons, which every evaluator has to parse), and 300
detections per image (boxes to 2 decimals, scores to 4). Wall time and peak RSS are for the whole
child process: interpreter start, imports, json loading, evaluation; CPU time (user + sys of the
child) is reported too, since wall time on a shared machine depends on the load.

``--iou-type segm`` writes a separate set whose gt polygons are octagons inside the boxes and
whose detections carry a compressed RLE ``segmentation`` (an octagon in the detection's box,
rasterised by pycocotools; no ``bbox`` key, so every evaluator takes the mask area), and runs
every evaluator with iou_type segm.

    python benchmarks/eval_speed.py --images 5000 --readers   # result-json readers only

times reading the detections file into columns, each reader in its own subprocess: ltdet's
(msgspec, chunked), and orjson / the json module building dicts for ltdet's dict path. The
measurement that chose msgspec is in docs/evaluation.md ("Reading result files").
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

METRICS = [
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "APr",
    "APc",
    "APf",
    "AR@300",
    "ARs@300",
    "ARm@300",
    "ARl@300",
]
N_RCF = (337, 461, 405)


def _octagon(x, y, w, h, f=0.25):
    cx, cy = w * f, h * f
    return [
        x + cx,
        y,
        x + w - cx,
        y,
        x + w,
        y + cy,
        x + w,
        y + h - cy,
        x + w - cx,
        y + h,
        x + cx,
        y + h,
        x,
        y + h - cy,
        x,
        y + cy,
    ]


def generate(root, n_images, seed=0, segm=False):
    """Write gt.json and dets.json under ``root`` (skipped when both exist for these args)."""
    os.makedirs(root, exist_ok=True)
    gt_path, det_path = os.path.join(root, "gt.json"), os.path.join(root, "dets.json")
    stamp = os.path.join(root, f"done_{n_images}_{seed}")
    if os.path.exists(stamp) and os.path.exists(gt_path) and os.path.exists(det_path):
        return gt_path, det_path
    rng = np.random.default_rng(seed)
    K = sum(N_RCF)
    freq = np.array(["r"] * N_RCF[0] + ["c"] * N_RCF[1] + ["f"] * N_RCF[2])
    rng.shuffle(freq)
    # Long tail: a class's chance to appear on an image spans ~3 orders of magnitude.
    weight = np.where(
        freq == "f",
        rng.uniform(20, 400, K),
        np.where(freq == "c", rng.uniform(2, 20, K), rng.uniform(0.2, 2, K)),
    )
    p_cls = weight / weight.sum()
    W, H = 640, 480

    def sample_boxes(n):
        # sqrt(area) log-normal: ~58% below 32 px, ~15% above 96 px.
        side = np.exp(rng.normal(np.log(26.0), 0.95, n)).clip(2, 470)
        ar = np.exp(rng.normal(0, 0.5, n))
        w = (side * np.sqrt(ar)).clip(1, W - 1)
        h = (side / np.sqrt(ar)).clip(1, H - 1)
        x = rng.uniform(0, 1, n) * (W - w)
        y = rng.uniform(0, 1, n) * (H - h)
        return np.round(np.stack([x, y, w, h], 1), 2)

    images, anns, det_rows = [], [], []
    img_ids = np.arange(1, n_images + 1) * 3
    n_pos_cls = 1 + rng.poisson(2.5, n_images)
    ann_id = 1
    for i, img_id in enumerate(img_ids.tolist()):
        pos = np.unique(rng.choice(K, size=n_pos_cls[i], p=p_cls))
        n_box = max(1, rng.poisson(12))
        box_cls = pos[rng.integers(0, len(pos), n_box)]
        boxes = sample_boxes(n_box)
        for b, c in zip(boxes.tolist(), box_cls.tolist()):
            x, y, w, h = b
            poly = (
                [round(v, 2) for v in _octagon(x, y, w, h)]
                if segm
                else [x, y, x + w, y, x + w, y + h, x, y + h]
            )
            # LVIS' area is the mask's: an octagon cutting a quarter of each side keeps 7/8.
            anns.append(
                {
                    "id": ann_id,
                    "image_id": img_id,
                    "category_id": c + 1,
                    "bbox": b,
                    "area": round(w * h * (0.875 if segm else 1.0), 2),
                    "segmentation": [poly],
                }
            )
            ann_id += 1
        rest = np.setdiff1d(rng.choice(K, size=rng.poisson(9) + 1, p=p_cls), pos)
        nel = pos[rng.random(len(pos)) < 0.15]
        images.append(
            {
                "id": img_id,
                "width": W,
                "height": H,
                "neg_category_ids": (rest + 1).tolist(),
                "not_exhaustive_category_ids": (nel + 1).tolist(),
            }
        )
        # 300 detections: jittered copies of the gt (right or confused class), the rest random.
        n_true = min(300, 3 * n_box)
        src = rng.integers(0, n_box, n_true)
        jit = boxes[src] + rng.normal(0, 0.08, (n_true, 4)) * boxes[src][:, [2, 3, 2, 3]]
        jit[:, 2:] = np.abs(jit[:, 2:]).clip(min=1)
        cls_true = np.where(rng.random(n_true) < 0.7, box_cls[src], rng.choice(K, n_true, p=p_cls))
        n_rand = 300 - n_true
        d_box = np.round(np.concatenate([jit, sample_boxes(n_rand)]), 2)
        d_cls = np.concatenate([cls_true, rng.choice(K, n_rand, p=p_cls)]) + 1
        d_score = np.round(np.concatenate([rng.beta(3, 2, n_true), rng.beta(1, 6, n_rand)]), 4)
        det_rows.append((img_id, d_cls, d_box, d_score))
    cats = []
    for k in range(K):
        cats.append(
            {
                "id": k + 1,
                "name": f"class_{k + 1}",
                "synset": f"class_{k + 1}.n.01",
                "frequency": str(freq[k]),
                "image_count": 0,
                "instance_count": 0,
            }
        )
    a_cat = np.array([a["category_id"] for a in anns]) - 1
    a_img = np.array([a["image_id"] for a in anns])
    inst = np.bincount(a_cat, minlength=K)
    imgc = np.bincount(np.unique(np.stack([a_img, a_cat], 1), axis=0)[:, 1], minlength=K)
    for k, c in enumerate(cats):
        # "Training" counts consistent with the frequency group (the val json carries train counts).
        lo, hi = {"r": (1, 10), "c": (11, 100), "f": (101, 5000)}[c["frequency"]]
        c["image_count"] = int(rng.integers(lo, hi + 1))
        c["instance_count"] = int(c["image_count"] * (1 + inst[k] / max(imgc[k], 1)))
    with open(gt_path, "w") as f:
        json.dump(
            {"images": images, "annotations": anns, "categories": cats, "info": {}, "licenses": []},
            f,
        )
    fmt = '{"image_id": %d, "category_id": %d, "bbox": [%.2f, %.2f, %.2f, %.2f], "score": %.4f}'
    with open(det_path, "w") as f:
        f.write("[")
        for n, (img_id, c, b, s) in enumerate(det_rows):
            rows = zip(c.tolist(), b.tolist(), s.tolist())
            if segm:
                import pycocotools.mask as mask_utils

                rles = mask_utils.frPyObjects([_octagon(*bi) for bi in b.tolist()], H, W)
                part = ", ".join(
                    json.dumps(
                        {
                            "image_id": img_id,
                            "category_id": ci,
                            "segmentation": {"size": [H, W], "counts": r["counts"].decode()},
                            "score": si,
                        }
                    )
                    for (ci, bi, si), r in zip(rows, rles)
                )
            else:
                part = ", ".join(fmt % (img_id, ci, *bi, si) for ci, bi, si in rows)
            f.write((", " if n else "") + part)
        f.write("]")
    open(stamp, "w").close()
    return gt_path, det_path


# ------------------------------------------------------------------------------------------------
# Children: one evaluator each; print one json line with the metrics and the peak RSS.


def run_ltdet(gt, dets, iou_type="bbox"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ltdet.evaluation import evaluate_lvis

    res = evaluate_lvis(gt, dets, iou_type=iou_type)
    return {k: res[k] for k in METRICS}


def run_lvis(gt, dets, iou_type="bbox"):
    np.float = float  # the lvis package still calls np.float (removed in NumPy 1.24)
    from lvis import LVISEval

    e = LVISEval(gt, dets, iou_type)
    e.run()
    return {k: float(v) for k, v in e.get_results().items()}


def run_fce(gt, dets, iou_type="bbox"):
    from faster_coco_eval import COCO, COCOeval_faster

    g = COCO(gt)
    with open(dets) as f:
        results = json.load(f)
    # loadRes does not apply LVIS's top-300-per-image cap: do it as LVISResults does.
    by_img = {}
    for r in results:
        by_img.setdefault(r["image_id"], []).append(r)
    results = [
        r
        for rs in by_img.values()
        for r in (sorted(rs, key=lambda r: r["score"], reverse=True)[:300])
    ]
    e = COCOeval_faster(
        g, g.loadRes(results), iou_type, lvis_style=True, print_function=lambda *a: None
    )
    e.params.maxDets = [300]
    e.evaluate()
    e.accumulate()
    e.summarize()
    s = e.stats_as_dict
    names = {
        "AP": "AP_all",
        "AP50": "AP_50",
        "AP75": "AP_75",
        "APs": "AP_small",
        "APm": "AP_medium",
        "APl": "AP_large",
        "APr": "APr",
        "APc": "APc",
        "APf": "APf",
        "AR@300": "AR_all",
        "ARs@300": "AR_small",
        "ARm@300": "AR_medium",
        "ARl@300": "AR_large",
    }
    return {k: s[v] for k, v in names.items() if v in s}


RUNNERS = {"ltdet": run_ltdet, "lvis": run_lvis, "faster-coco-eval": run_fce}


def read_whole(loads):
    def read(dets):
        from ltdet.evaluation.results_io import load_detections

        with open(dets, "rb") as f:
            return load_detections(loads(f.read()), source=dets)

    return read


def read_ltdet(dets):
    from ltdet.evaluation.results_io import load_detections

    return load_detections(dets)


def read_orjson(dets):
    import orjson

    return read_whole(orjson.loads)(dets)


READERS = {"ltdet": read_ltdet, "orjson": read_orjson, "json": read_whole(json.loads)}


def child(name, gt, dets, iou_type="bbox"):
    if name.startswith("read-"):
        import ltdet.evaluation.results_io  # noqa: F401  (imports are not the reader's cost)

        base = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        cols = READERS[name[5:]](dets)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(
            "RESULT "
            + json.dumps(
                {
                    "read_s": time.perf_counter() - t,
                    "n": len(cols),
                    "peak_mb": usage.ru_maxrss / 1024,
                    "above_imports_mb": (usage.ru_maxrss - base.ru_maxrss) / 1024,
                    "cpu_s": usage.ru_utime + usage.ru_stime - base.ru_utime - base.ru_stime,
                }
            )
        )
        return
    metrics = RUNNERS[name](gt, dets, iou_type)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        "RESULT "
        + json.dumps(
            {
                "metrics": metrics,
                "peak_mb": usage.ru_maxrss / 1024,
                "cpu_s": usage.ru_utime + usage.ru_stime,
            }
        )
    )


def compare_readers(gt, dets, env):
    print("| reader | read wall s | read CPU s | peak RSS MB | above imports MB |")
    print("|---|---|---|---|---|")
    for name in READERS:
        p = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", f"read-{name}", gt, dets],
            capture_output=True,
            text=True,
            env=env,
        )
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            print(f"{name}: failed (rc {p.returncode}) {p.stderr[-2000:]}")
            continue
        o = json.loads(lines[-1][7:])
        print(
            f"| {name} | {o['read_s']:.2f} | {o['cpu_s']:.2f} | {o['peak_mb']:.0f} | "
            f"{o['above_imports_mb']:.0f} |",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--root", default="data/generated/eval_speed")
    ap.add_argument("--only", nargs="*", default=list(RUNNERS), choices=list(RUNNERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--readers",
        action="store_true",
        help="time the result-json readers instead of the evaluators",
    )
    ap.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    ap.add_argument("--child", nargs=3, metavar=("NAME", "GT", "DETS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, iou_type=args.iou_type)

    segm = args.iou_type == "segm"
    root = os.path.join(args.root, f"{args.images}" + ("_segm" if segm else ""))
    t0 = time.time()
    gt, dets = generate(root, args.images, args.seed, segm=segm)
    print(
        f"set: {args.images} images, {os.path.getsize(dets) / 1e6:.0f} MB of detections, "
        f"{os.path.getsize(gt) / 1e6:.0f} MB gt ({time.time() - t0:.0f} s to prepare)"
    )
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if args.readers:
        return compare_readers(gt, dets, env)
    rows = {}
    for name in args.only:
        t = time.time()
        p = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--iou-type",
                args.iou_type,
                "--child",
                name,
                gt,
                dets,
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.time() - t
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{name}: failed (rc {p.returncode}) {p.stderr[-2000:]}")
            continue
        out = json.loads(line[-1][7:])
        rows[name] = dict(
            wall=wall, cpu=out["cpu_s"], peak_mb=out["peak_mb"], metrics=out["metrics"]
        )
        print(
            f"  {name}: {wall:.1f} s wall, {out['cpu_s']:.1f} s CPU, {out['peak_mb']:.0f} MB",
            flush=True,
        )

    ref = rows.get("lvis")
    print(
        "\n| evaluator | wall s | CPU s | peak RSS MB | speed-up vs lvis (wall / CPU) | "
        "memory vs lvis | max abs metric diff vs lvis | AP |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        sp = f"{ref['wall'] / r['wall']:.1f}x / {ref['cpu'] / r['cpu']:.1f}x" if ref else "-"
        mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}" if ref else "-"
        diff = "-"
        if ref:
            common = [k for k in METRICS if k in r["metrics"] and k in ref["metrics"]]
            diff = f"{max(abs(r['metrics'][k] - ref['metrics'][k]) for k in common):.2e}"
        print(
            f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['peak_mb']:.0f} | {sp} | {mem} | "
            f"{diff} | "
            f"{r['metrics'].get('AP', float('nan')):.4f} |"
        )


if __name__ == "__main__":
    main()
