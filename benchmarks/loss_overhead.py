"""Training-step overhead of ltdet losses in torchvision detectors, vanilla vs patched.

For each loss of `ltdet.losses.LOSSES`, times a full training step (forward + backward) of a
torchvision Faster R-CNN (and RetinaNet) patched with it, against the unpatched model with the same
weights and inputs, alternating the two step by step (vanilla, patched, patched, vanilla, ...) so
that drifting machine load hits both alike; reports the median per-pair ratio (target <= 1.05).

    python benchmarks/loss_overhead.py                       # 1203 classes (LVIS), CPU
    python benchmarks/loss_overhead.py --arch retinanet --reps 5 --size 192 --device cuda
"""

import argparse
import copy
import statistics
import sys
import time

import torch
import torchvision

import ltdet
from ltdet.data import ClassStats
from ltdet.losses import LOSSES, build_loss

ARCHS = {
    "faster_rcnn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "faster_rcnn_mobilenet": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
    "retinanet": torchvision.models.detection.retinanet_resnet50_fpn,
}


def long_tailed_stats(num_classes: int) -> ClassStats:
    """Zipf-like per-class counts, LVIS-sized: class 1 has 20k instances, the tail 1."""
    rank = torch.arange(1, num_classes + 1, dtype=torch.float32)
    instances = (20000.0 / rank.pow(1.3)).clamp(min=1).round()
    images = (instances * 0.6).clamp(min=1).round()
    return ClassStats(image_count=images, instance_count=instances, num_images=20000)


def detection_batch(num_classes, size, batch, boxes_per_image, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(boxes_per_image, 2, generator=g) * size * 0.6
        wh = 8 + torch.rand(boxes_per_image, 2, generator=g) * size * 0.4
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        labels = torch.randint(1, num_classes + 1, (boxes_per_image,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: "cpu": process CPU time - on a shared CPU box with one thread per process, it does not count
#: the time other processes hold the cores; "wall": elapsed time (always used on CUDA)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = CLOCKS["wall"]


def step_time(model, images, targets, device, seed) -> float:
    torch.manual_seed(seed)  # same proposals / sampled RoIs for both models of a pair
    sync(device)
    start = CLOCK()
    losses = model(images, targets)
    sum(losses.values()).backward()
    sync(device)
    elapsed = CLOCK() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def paired_ratio(vanilla, patched, images, targets, device, reps):
    """(median vanilla seconds, median patched seconds, median per-pair ratio)."""
    step_time(patched, images, targets, device, 0)  # warm-up (allocator, lazy init)
    v_times, p_times, ratios = [], [], []
    for rep in range(reps):
        order = [(vanilla, v_times), (patched, p_times)]
        if rep % 2:
            order.reverse()
        for model, times in order:
            times.append(step_time(model, images, targets, device, rep + 1))
        ratios.append(p_times[-1] / v_times[-1])
    return statistics.median(v_times), statistics.median(p_times), statistics.median(ratios)


def set_clock(name, device):
    global CLOCK
    if name is None:
        name = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if name == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu measures CPU work only; use wall time on an accelerator")
    CLOCK = CLOCKS[name]
    return name


#: dense-head methods that are more than one loss: name -> `ltdet.patch` arguments. gfl's
#: regression head is also wider (17 bins per side: 4 x 17 outputs per anchor instead of 4), so
#: its ratio includes that head's extra convolution output, not only the losses.
DENSE_COMBINATIONS = {
    "gfl": {
        "cls_loss": {"type": "qfl"},
        "box_loss": {"type": "giou", "loss_weight": 2.0},
        "dfl": {"reg_max": 16, "loss_weight": 0.25, "score_weighted": True},
    },
}


def loss_kinds(num_classes, stats):
    """(name, 'cls' | 'box') for every registered loss."""
    kinds = []
    for name in sorted(LOSSES):
        module = build_loss({"type": name}, num_classes=num_classes, stats=stats)
        kinds.append((name, "cls" if hasattr(module, "activation") else "box"))
    return kinds


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", nargs="+", default=["faster_rcnn", "retinanet"], choices=sorted(ARCHS)
    )
    parser.add_argument("--num-classes", type=int, default=1203)
    parser.add_argument("--size", type=int, default=160, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per image")
    parser.add_argument("--reps", type=int, default=3, help="timed pairs per loss")
    parser.add_argument("--losses", nargs="*", default=None, help="subset of loss types")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default=None,
        help="default: cpu with --device cpu and 1 thread, else wall",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    set_clock(args.clock, device)
    c = args.num_classes
    stats = long_tailed_stats(c)
    kinds = [k for k in loss_kinds(c, stats) if args.losses is None or k[0] in args.losses]
    images, targets = detection_batch(c, args.size, args.batch, args.boxes, device)
    print(
        f"# training-step time, patched / vanilla torchvision, C={c}, {args.batch} images of "
        f"{args.size}px, {args.reps} alternating pairs, device={device}, "
        f"threads={torch.get_num_threads()}, "
        f"clock={'cpu' if CLOCK is time.process_time else 'wall'}"
    )
    print(f"{'arch':<22} {'loss':<18} {'kind':<4} {'vanilla s':>9} {'patched s':>9} {'ratio':>7}")
    worst = 0.0
    for arch in args.arch:
        torch.manual_seed(0)
        vanilla = (
            ARCHS[arch](
                weights=None,
                weights_backbone=None,
                num_classes=c + 1,
                min_size=args.size,
                max_size=args.size,
            )
            .to(device)
            .train()
        )
        variants = [("(patch, defaults)", {})] + [
            (name, {f"{kind}_loss": {"type": name}}) for name, kind in kinds
        ]
        if arch.startswith("retinanet"):
            variants += [
                (name, kwargs)
                for name, kwargs in DENSE_COMBINATIONS.items()
                if args.losses is None or name in args.losses
            ]
        for name, kwargs in variants:
            patched = copy.deepcopy(vanilla)
            try:
                ltdet.patch(patched, stats=stats, **kwargs)
            except (TypeError, ValueError) as e:
                print(f"{arch:<22} {name:<18} {'-':<4} {'n/a':>9} {'n/a':>9} {'n/a':>7}  ({e})")
                continue
            patched.to(device).train()
            kind = ("all" if len(kwargs) > 1 else next(iter(kwargs))[:3]) if kwargs else "-"
            v, p, ratio = paired_ratio(vanilla, patched, images, targets, device, args.reps)
            if kwargs:
                worst = max(worst, ratio)
            print(f"{arch:<22} {name:<18} {kind:<4} {v:9.3f} {p:9.3f} {ratio:7.3f}", flush=True)
            del patched
    print(f"# worst ratio over losses: {worst:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
