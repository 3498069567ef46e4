"""Training-step time of the RoI samplers (OHEM, PISA, random with bg_iou_lo) against torchvision's
own random sampler, same Faster R-CNN weights and inputs, alternating step by step.

OHEM and PISA run the box head once more, without gradient, on every candidate RoI (OHEM) or every
negative (PISA's score-HLR): that extra pass is the expected cost.

    python benchmarks/roi_sampler_overhead.py --num-classes 1203 --size 160 --reps 3
"""

import argparse
import copy
import sys

import torch
from loss_overhead import ARCHS, detection_batch, long_tailed_stats, paired_ratio, set_clock

import ltdet

SAMPLERS = {
    "random": {"type": "random"},
    "random bg_iou_lo=0.1": {"type": "random", "bg_iou_lo": 0.1},
    "ohem": {"type": "ohem"},
    "ohem (no nms)": {"type": "ohem", "nms_thresh": None},
    "pisa": {"type": "pisa"},
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", default="faster_rcnn", choices=["faster_rcnn", "faster_rcnn_mobilenet"]
    )
    parser.add_argument("--num-classes", type=int, default=1203)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--cls-loss", default="ce", help="classification loss type for every sampler"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = set_clock(args.clock, device)
    c = args.num_classes
    stats = long_tailed_stats(c)
    images, targets = detection_batch(c, args.size, args.batch, args.boxes, device)
    torch.manual_seed(0)
    vanilla = (
        ARCHS[args.arch](
            weights=None,
            weights_backbone=None,
            num_classes=c + 1,
            min_size=args.size,
            max_size=args.size,
        )
        .to(device)
        .train()
    )
    print(
        f"# training-step time vs torchvision's random sampler: {args.arch}, C={c}, cls_loss="
        f"{args.cls_loss}, {args.batch} images of {args.size}px, {args.reps} alternating pairs, "
        f"device={device}, clock={clock}"
    )
    print(f"{'sampler':<22} {'torchvision s':>13} {'sampler s':>9} {'ratio':>7}")
    for name, cfg in SAMPLERS.items():
        patched = (
            ltdet.patch(
                copy.deepcopy(vanilla), cls_loss={"type": args.cls_loss}, sampler=cfg, stats=stats
            )
            .to(device)
            .train()
        )
        v, p, ratio = paired_ratio(vanilla, patched, images, targets, device, args.reps)
        print(f"{name:<22} {v:13.3f} {p:9.3f} {ratio:7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
