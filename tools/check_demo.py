#!/usr/bin/env python
"""Exit 1 unless a finished demo run meets the demo's two bars, read from its metrics.json.

    python tools/check_demo.py                       # runs/synthetic/faster_rcnn_r18_fpn
    python tools/check_demo.py path/to/metrics.json

The bars (`ltdet.scripts.demo`, which tools/demo.py runs): the detector learns (AP50 on the
frequent classes >= 0.5) and the long tail bites (APr <= APf / 2 for the plain softmax baseline).
CI runs this after `make demo`.
"""

import json
import sys
from pathlib import Path

from ltdet.scripts.demo import MAX_APR_OVER_APF, MIN_AP50_FREQUENT

DEFAULT = "runs/synthetic/faster_rcnn_r18_fpn/metrics.json"


def check(metrics: dict) -> list:
    """The failed bars, as sentences (empty when the demo passes)."""
    failed = []
    for key in ("AP50f", "APr", "APf"):
        if not isinstance(metrics.get(key), (int, float)) or metrics[key] < 0:
            # -1 is lvis's "undefined": a bar must not pass on it
            failed.append(f"metrics.json has no defined value for {key} ({metrics.get(key)!r})")
    if failed:
        return failed
    if not metrics["AP50f"] >= MIN_AP50_FREQUENT:
        failed.append(
            f"AP50 on the frequent classes is {metrics['AP50f']:.3f} < "
            f"{MIN_AP50_FREQUENT}: the detector did not learn"
        )
    if not metrics["APr"] <= MAX_APR_OVER_APF * metrics["APf"]:
        failed.append(
            f"APr {metrics['APr']:.3f} > {MAX_APR_OVER_APF} * APf "
            f"{metrics['APf']:.3f}: the baseline does not show the long tail"
        )
    return failed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else DEFAULT)
    if not path.is_file():
        print(f"demo check: {path} does not exist (did `make demo` finish?)", file=sys.stderr)
        return 1
    metrics = json.loads(path.read_text(encoding="utf-8"))
    failed = check(metrics)
    for line in failed:
        print(f"demo check FAILED: {line}", file=sys.stderr)
    if not failed:
        print(
            f"demo check passed: AP50f {metrics['AP50f']:.3f} >= {MIN_AP50_FREQUENT}, "
            f"APr {metrics['APr']:.3f} <= {MAX_APR_OVER_APF} * APf {metrics['APf']:.3f} ({path})"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
