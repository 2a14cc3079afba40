#!/usr/bin/env bash
# One entry point that also does the set-up: ./run.sh demo | test | setup
#   demo  - tools/demo.py: the shapes world end to end on CPU; extra args go to it
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
  # the shapes world: stand-ins trained here, then stage 1 -> 2 -> 3 and Unified-Bench on held-out images
  $PY tools/demo.py "$@"
}

cmd=${1:-demo}
setup
case "$cmd" in
  setup) ;;
  demo) [ $# -gt 0 ] && shift; demo "$@" ;;
  test) exec $PY -m pytest -q tests ;;
  *) echo "usage: ./run.sh demo | test | setup" >&2; exit 2 ;;
esac
