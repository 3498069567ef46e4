#!/usr/bin/env bash
# The checks that need a CUDA machine (sized for one H200 with 16 CPU cores), in one script that
# finishes in under 8 minutes and prints one table:
#   1. the demo model (configs/synthetic/faster_rcnn_r18_fpn.yaml) at full resolution (800 px)
#      with AMP: ltdet's Trainer against torchvision's reference loop with torchvision's own
#      losses, 3 alternating blocks of 50 iterations each after 20 warm-up iterations
#      (benchmarks/train_throughput.py): images/s and peak CUDA memory of each;
#   2. ltdet.evaluation.evaluate_lvis on CUDA against CPU on the generated 5,000-image LVIS-like
#      set of benchmarks/eval_speed.py (1203 classes, 300 detections per image);
#   3. benchmarks/loss_overhead.py on CUDA: every ltdet loss patched into torchvision's Faster
#      R-CNN and RetinaNet (R50-FPN, 1203 classes, 640 px), training-step time against vanilla.
#
#   bash benchmarks/device_check.sh                 # on the CUDA machine
#   bash benchmarks/device_check.sh --quick         # everything tiny on CPU (< 2 min; CI)
#   bash benchmarks/device_check.sh --out DIR       # logs and json here (default: $OUT, else
#                                                   # runs/device_check)
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3);
# DEVICE_CHECK_DATA the folder of the generated evaluation sets (default data/generated/eval_speed,
# benchmarks/eval_speed.py's, so a set made once is reused). Each step runs under its own
# timeout; a step that fails or times out is marked in the table, the others still run, and the
# script then exits non-zero. Each step's full output is in DIR/<step>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
LOGS=${OUT:-runs/device_check}
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --out) LOGS=$2; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$LOGS"
start=$(date +%s)

# Settings: full run on CUDA, --quick on CPU with everything tiny.
if [[ $QUICK == 1 ]]; then
    DEVICE=cpu
    EVAL_DEVICES=cpu,cpu        # the accelerator's code path, run on the CPU
    EVAL_IMAGES=200
    # one thread: CI's 2-core machine is shared, and spinning OpenMP threads thrash there
    THROUGHPUT_ARGS=(--quick --threads 1)
    LOSS_ARGS=(--device cpu --threads 1 --num-classes 30 --size 64 --batch 1 --reps 1
               --losses eqlv2 focal)
    # about a minute and a half in all on an idle 2-core machine; the limits catch a hang
    T_THROUGHPUT=240 T_EVAL=120 T_LOSS=240
else
    DEVICE=cuda
    EVAL_DEVICES=cpu,cuda,cuda
    EVAL_IMAGES=5000
    THROUGHPUT_ARGS=(--device cuda --amp --size 800 --threads 8 --workers 6 --warmup 20
                     --iters 50 --blocks 3)
    LOSS_ARGS=(--device cuda --size 640 --batch 2 --reps 4)
    T_THROUGHPUT=180 T_EVAL=150 T_LOSS=110
fi

echo "== device"
"$PYTHON" - "$DEVICE" <<'EOF' | tee "$LOGS/device.txt"
import os, sys
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"CUDA {torch.version.cuda}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.get_device_name(0)}: {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
elif sys.argv[1] == "cuda":
    sys.exit("no CUDA device: run on the CUDA machine, or pass --quick (CPU)")
else:
    print("no CUDA device (--quick runs on the CPU)")
EOF

failed=()
# run_step NAME TIMEOUT_S CMD...: the command's output goes to $LOGS/NAME.log; one line here.
run_step() {
    local name=$1 limit=$2 t0 rc=0
    shift 2
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    if [[ $rc == 0 ]]; then
        echo "== $name: done in $(( $(date +%s) - t0 )) s"
    else
        [[ $rc == 124 || $rc == 137 ]] && echo "timed out after $limit s" >>"$LOGS/$name.log"
        echo "== $name: FAILED (exit $rc) after $(( $(date +%s) - t0 )) s; tail of $LOGS/$name.log:"
        tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'
        failed+=("$name")
    fi
    echo "$rc" >"$LOGS/$name.rc"
}

run_step throughput "$T_THROUGHPUT" "$PYTHON" benchmarks/train_throughput.py \
    "${THROUGHPUT_ARGS[@]}" --reference-losses torchvision --json "$LOGS/throughput.json"

run_step eval "$T_EVAL" "$PYTHON" - "$EVAL_IMAGES" "$EVAL_DEVICES" "$LOGS/eval.json" \
    "${DEVICE_CHECK_DATA:-data/generated/eval_speed}" <<'EOF'
# evaluate_lvis on each device of argv[2] in turn, on the generated set; the json files are
# parsed once beforehand so that the times are the evaluation's. The first call on CUDA pays for
# loading its kernels: CUDA is named twice, and the table shows both calls.
import json, os, sys, time
import torch
sys.path.insert(0, "benchmarks")
from eval_speed import METRICS, generate
from ltdet.evaluation import evaluate_lvis

n, devices, out, root = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4]
t = time.perf_counter()
gt_path, det_path = generate(os.path.join(root, str(n)), n)
print(f"set of {n} images ready in {time.perf_counter() - t:.0f} s")
with open(gt_path) as f:
    gt = json.load(f)
with open(det_path) as f:
    dets = json.load(f)
if "cuda" in devices:
    torch.zeros(1, device="cuda")  # the CUDA context, untimed
runs = []
for device in devices:
    t = time.perf_counter()
    res = evaluate_lvis(gt, dets, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    runs.append(dict(device=device, seconds=time.perf_counter() - t,
                     metrics={k: res[k] for k in METRICS}))
    print(f"{device}: {runs[-1]['seconds']:.1f} s, AP {res['AP']:.4f}", flush=True)
ref = runs[0]["metrics"]
diff = max(abs(r["metrics"][k] - ref[k]) for r in runs for k in METRICS)
with open(out, "w") as f:
    json.dump(dict(images=n, detections=len(dets), threads=torch.get_num_threads(), runs=runs,
                   max_metric_diff=diff), f, indent=2)
EOF

run_step loss_overhead "$T_LOSS" "$PYTHON" benchmarks/loss_overhead.py "${LOSS_ARGS[@]}"

"$PYTHON" - "$LOGS" "$QUICK" "$(( $(date +%s) - start ))" <<'EOF'
# The one table, from the steps' json and logs.
import json, os, statistics, sys

logs, quick, seconds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
rows = []


def load(name):
    path = os.path.join(logs, name)
    return json.load(open(path)) if os.path.isfile(path) else None


def failed(step):
    rc = open(os.path.join(logs, f"{step}.rc")).read().strip()
    return None if rc == "0" else f"FAILED (exit {rc}), see {logs}/{step}.log"


info = open(os.path.join(logs, "device.txt")).read().strip().splitlines()
rows.append(("device", "", "; ".join(info)))

tp = load("throughput.json")
if failed("throughput") or tp is None:
    rows.append(("train throughput", "", failed("throughput") or "no result"))
else:
    setting = (f"demo R18-FPN, {tp['min_size'][0]} px, batch {tp['batch']}, AMP "
               f"{'on' if tp['amp'] else 'off'}, {tp['blocks']} x {tp['iters']} it per loop")
    for key, label in (("ltdet", "ltdet Trainer (ltdet CE losses)"),
                       ("torchvision", "torchvision reference loop + torchvision losses")):
        r = tp["loops"][key]
        mem = f", peak {r['peak_mb']:.0f} MB" if r["peak_mb"] is not None else ""
        rows.append((f"train: {label}", setting,
                     f"{r['images_per_s']:.1f} images/s ({r['ms_per_iter']:.0f} ms/it){mem}"))
    p = tp["pair_ratios"]
    rows.append(("train: ratio ltdet / torchvision", "goal >= 0.95",
                 f"{tp['ratio']:.3f} (block pairs {min(p):.3f}-{max(p):.3f})"))

ev = load("eval.json")
if failed("eval") or ev is None:
    rows.append(("evaluate_lvis", "", failed("eval") or "no result"))
else:
    setting = f"{ev['images']} images, {ev['detections']:,} detections, {ev['threads']} threads"
    by = {}
    for r in ev["runs"]:
        by.setdefault(r["device"], []).append(r["seconds"])
    for device, times in by.items():
        extra = f" (again: {times[1]:.1f} s)" if len(times) > 1 else ""
        rows.append((f"evaluate_lvis on {device}", setting, f"{times[0]:.1f} s{extra}"))
    if "cuda" in by:
        rows.append(("evaluate_lvis CUDA speed-up", "CPU / second CUDA call",
                     f"{by['cpu'][0] / by['cuda'][-1]:.1f}x; max /metric diff/ "
                     f"{ev['max_metric_diff']:.1e}"))
    else:
        rows.append(("evaluate_lvis agreement", "",
                     f"max /metric diff/ {ev['max_metric_diff']:.1e}"))

if failed("loss_overhead"):
    rows.append(("loss overhead", "", failed("loss_overhead")))
else:
    lines = open(os.path.join(logs, "loss_overhead.log")).read().splitlines()
    head = next((l.lstrip("# ") for l in lines if l.startswith("# training-step")), "")
    per_arch = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or line.startswith("#") or parts[0] == "arch" or "n/a" in parts:
            continue
        name = " ".join(parts[1:-4])
        per_arch.setdefault(parts[0], []).append((name, float(parts[-1])))
    for arch, items in per_arch.items():
        base = [r for n, r in items if n.startswith("(patch")]
        losses = [(r, n) for n, r in items if not n.startswith("(patch")]
        worst = max(losses) if losses else (float("nan"), "-")
        rows.append((f"loss overhead, {arch}", head.split("torchvision, ", 1)[-1],
                     f"patched / vanilla step: defaults {base[0] if base else float('nan'):.3f}, "
                     f"median over {len(losses)} losses "
                     f"{statistics.median(r for r, _ in losses) if losses else float('nan'):.3f}, "
                     f"worst {worst[0]:.3f} ({worst[1]}); target <= 1.05"))

print(f"\n## device check{' (--quick, CPU)' if quick else ''}: {seconds} s\n")
print("| check | setting | result |")
print("|---|---|---|")
for row in rows:
    print("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
EOF

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "device_check.sh: failed steps: ${failed[*]}" >&2
    exit 1
fi
