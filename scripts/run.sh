#!/usr/bin/env bash
# Set up (or refresh) the virtual env, then run the main job or the test suite.
#   bash scripts/run.sh demo [var demo options]   # digits demo on CPU: trains, samples, reports
#   bash scripts/run.sh test [pytest options]     # ruff + the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VAR_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.installed-$(cat setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  case "$(uname -m)" in
    x86_64) python -m pip install -q torch==2.14.1 torchvision==0.29.1 ;;
    aarch64) python -m pip install -q torch==2.9.1 torchvision==0.24.1 ;;
  esac
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
job=${1:-}
shift || true
case "$job" in
  demo) exec var demo --out "${VAR_DEMO_OUT:-out/demo}" "$@" ;;
  test) ruff check . && exec python -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [options]" >&2; exit 2 ;;
esac
