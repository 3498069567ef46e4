#!/usr/bin/env bash
# A non-editable install works: build ltdet's wheel, install it (without -e) with the pinned
# torch / torchvision into a fresh venv in a temporary folder, and from that folder - outside
# the repository, so nothing can import the checkout - run `ltdet-train --help`, a 2-iteration
# training run on a tiny generated data set, and `ltdet-test` on its checkpoint. Catches what an
# editable install hides: package data (the config schema), entry points, modules missing from
# the wheel, dependencies setup.py does not declare. About a minute on an idle 2-core machine
# (the requirements are hard-linked from .venv, below; SMOKE_PIP=1 pip-installs them: +3 min).
#   PY: the Python that builds the wheel and the venv (default python3)
#   TORCH_PIN: what `make venv` pins (kept in step with the Makefile)
#   KEEP_TMP=1: keep the temporary folder (printed) for a look afterwards
#   SMOKE_PIP=1: pip-install torch and the requirements instead of hard-linking them
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
TORCH_PIN=${TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"}
start=$(date +%s)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ltdet-wheel-smoke.XXXXXX")
if [[ "${KEEP_TMP:-0}" == 1 ]]; then echo "wheel smoke: keeping $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi
unset PYTHONPATH
step() { echo "wheel smoke [$(( $(date +%s) - start )) s]: $*"; }
# pip -q still prints one warning per unused local index folder; keep its errors
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

step "building the wheel"
# from a copy of the files git tracks or would track: a stale build/ folder or an ignored file in
# the checkout cannot reach the wheel
"$PY" - "$repo" "$tmp/src" <<'PYEOF'
import os, shutil, subprocess, sys
repo, dst = sys.argv[1:]
listed = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others",
                         "--exclude-standard"], check=True, capture_output=True).stdout
for rel in filter(None, listed.decode().split("\0")):
    if os.path.isfile(os.path.join(repo, rel)):  # not deleted in the work tree
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), os.path.join(dst, rel))
PYEOF
quiet_pip "$PY" -m pip wheel "$tmp/src" --no-deps --quiet -w "$tmp/dist"
wheel=$(ls "$tmp"/dist/ltdet-*.whl)
"$PY" - "$wheel" > "$tmp/requires.txt" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["ltdet/configs/base.yaml", "ltdet/scripts/train.py", "ltdet/scripts/test.py"]
missing = [n for n in need if n not in names]
entry = [n for n in names if n.endswith("entry_points.txt")]
text = zipfile.ZipFile(sys.argv[1]).read(entry[0]).decode() if entry else ""
missing += [s for s in ("ltdet-train", "ltdet-test", "ltdet-calibrate") if s not in text]
if missing:
    sys.exit(f"wheel smoke: the wheel lacks {missing}")
# what the wheel declares it needs (not the extras): the requirements the venv gets
meta = [n for n in names if n.endswith(".dist-info/METADATA")][0]
lines = zipfile.ZipFile(sys.argv[1]).read(meta).decode().splitlines()
reqs = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")]
print("\n".join(r for r in reqs if "extra ==" not in r))
PYEOF

step "a fresh venv with $TORCH_PIN and the wheel's requirements"
"$PY" -m venv "$tmp/venv"
bin="$tmp/venv/bin"
site=$("$bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mapfile -t requires < "$tmp/requires.txt"
# torch with its CUDA libraries is 5.5 GB and the other requirements take as long again to
# install: hard-link, from PY's environment (.venv, the same pins), the distributions the wheel
# declares and what they require - nothing else, so a dependency missing from setup.py still
# fails below. pip then sees them installed. Where that cannot be done (another file system, a
# version there that does not fit), or with SMOKE_PIP=1, pip installs everything.
# shellcheck disable=SC2086  # TORCH_PIN is two requirements
if [[ "${SMOKE_PIP:-0}" == 1 ]] ||
        ! "$PY" "$repo/.ci/link_installed.py" "$site" $TORCH_PIN "${requires[@]}"; then
    rm -rf "$tmp/venv" && "$PY" -m venv "$tmp/venv"
    # --no-compile: byte-compiling torch's Python files would add a third to the install time
    # shellcheck disable=SC2086
    quiet_pip "$bin/pip" install --quiet --no-compile $TORCH_PIN
fi
step "installing the wheel (not -e)"
# shellcheck disable=SC2086
quiet_pip "$bin/pip" install --quiet --no-compile "$wheel" $TORCH_PIN

cd "$tmp"  # outside the repository from here on
"$bin/python" -c "import sys, torch, torchvision, ltdet; p = ltdet.__file__; \
assert p.startswith(sys.prefix), f'ltdet imported from {p}, not from the venv'; \
print('wheel smoke: ltdet from', p, '- torch', torch.__version__, torchvision.__version__)"
"$bin/ltdet-train" --help > /dev/null  # (ltdet-test runs for real below)
"$bin/ltdet-calibrate" --help > /dev/null

step "generating a tiny data set"
"$bin/python" -m ltdet.scripts.make_synthetic --root "$tmp/data" --seed 0 --set num_train=8 \
    num_val=4 num_classes=3 image_size=64 min_radius=6 max_radius=16 max_images_per_class=6 \
    val_instances_per_class=2 > /dev/null
cat > "$tmp/tiny.yaml" <<YAML
# ResNet-18 FPN at 64 px with small RPN / RoI batches, 2 iterations
output_dir: $tmp/run
device: cpu
data:
  train: {json: $tmp/data/train.json, images: $tmp/data/images}
  val: {json: $tmp/data/val.json, images: $tmp/data/images}
  num_workers: 0
  batch_size: 2
  min_size: [64]
  max_size: 96
  test_min_size: 64
model:
  backbone: resnet18
  norm: bn
  trainable_backbone_layers: 5
  detections_per_img: 20
  rpn: {batch_size_per_image: 32, pre_nms_top_n_train: 100, post_nms_top_n_train: 50,
        pre_nms_top_n_test: 100, post_nms_top_n_test: 50}
  roi_heads: {batch_size_per_image: 32}
solver: {lr: 0.01, max_iter: 2, warmup_iters: 1, steps: [1], checkpoint_period: 2, log_period: 1}
YAML

step "ltdet-train: 2 iterations"
"$bin/ltdet-train" "$tmp/tiny.yaml" --no-progress > "$tmp/train.out" 2> "$tmp/train.err" || {
    cat "$tmp/train.out" "$tmp/train.err"; exit 1; }
for f in config.yaml log.jsonl metrics.json checkpoints/model_0000002.pth; do
    [[ -f "$tmp/run/$f" ]] || { echo "wheel smoke: ltdet-train wrote no $f"; exit 1; }
done

step "ltdet-test on its checkpoint"
"$bin/ltdet-test" "$tmp/tiny.yaml" --ckpt "$tmp/run/checkpoints/model_0000002.pth" \
    --out "$tmp/eval" > "$tmp/test.out" 2> "$tmp/test.err" || {
    cat "$tmp/test.out" "$tmp/test.err"; exit 1; }
[[ -f "$tmp/eval/metrics.json" ]] || { echo "wheel smoke: ltdet-test wrote no metrics.json"; exit 1; }

step "passed"
