#!/usr/bin/env bash
# One entry point that also does the set-up: ./run.sh demo | test | setup
#   demo  - the tiny pipeline end to end on the shapes world (CPU, a couple of minutes)
#   test  - the test suite (what CI runs)
#   setup - only create .venv and install requirements.txt
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python

setup() {
  [ -x "$PY" ] || python3 -m venv .venv
  local want have
  want=$(sha256sum requirements.txt | cut -c1-16)
  have=$(cat .venv/.requirements 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    .venv/bin/pip install -q -U pip
    .venv/bin/pip install -q -r requirements.txt
    echo "$want" > .venv/.requirements
  fi
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
}

demo() {
  local out=${OUT:-out/demo}
  $PY data/shapes/prepare.py --n_train 200 --n_val 8
  local D=data/shapes/train/captions.jsonl V=data/shapes/val
  local T="--preset tiny --resolution 64"
  $PY stage1_coldstart.py --preset tiny --image_size 64 --data $D --objective fm --steps 60 --batch_size 8 --lr 1e-3 \
      --sample_every 0 --save_every 1000 --out_dir $out/stage1_fm
  $PY stage1_coldstart.py --init $out/stage1_fm --image_size 64 --data $D --objective sem --reward pixel --steps 10 \
      --batch_size 4 --max_new_tokens 24 --lr 1e-3 --sample_every 10 --save_every 1000 --out_dir $out/stage1
  $PY stage2_grpo_und.py --init $out/stage1 --resolution 64 --data $D --reward pixel --steps 10 --G 4 --batch_size 2 \
      --max_new_tokens 24 --sample_steps 6 --cfg 1.0 --lr 5e-3 --sample_every 5 --save_every 1000 --out_dir $out/stage2
  $PY stage3_grpo_gen.py --init $out/stage2 --resolution 64 --data $D --reward pixel --steps 10 --G 4 --groups 2 \
      --sample_steps 6 --eval_steps 6 --max_new_tokens 24 --lr 1e-3 --sample_every 5 --save_every 1000 --out_dir $out/stage3
  $PY eval_unified.py --init $out/stage3 --src $V --out_dir $out/bench --steps 6 --max_new_tokens 24 --cfg 1.0 \
      --clip_path tiny --longclip_path tiny --dinov2_path tiny --dinov3_path tiny --backbones clip,longclip,dinov2,dinov3,pixel
  echo "demo done: samples in $out/*/samples, scores in $out/bench/unified_bench.json"
}

cmd=${1:-demo}
setup
case "$cmd" in
  setup) ;;
  demo) demo ;;
  test) exec $PY -m pytest -q tests ;;
  *) echo "usage: ./run.sh demo | test | setup" >&2; exit 2 ;;
esac
