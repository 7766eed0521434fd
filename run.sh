#!/usr/bin/env bash
# The two commands of imageselector. Needs only python3 (3.11+); everything else is set up here.
#   ./run.sh demo   create venv/, install, run the whole pipeline end to end (offline simulator
#                   when ETSY_API_KEY is unset) in a home of its own, print the status
#   ./run.sh test   create venv/ if missing, install the test tools, run the test suite
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"

hash_of() { cat "$@" | (sha256sum 2>/dev/null || shasum -a 256) | cut -c1-16; }

ensure_venv() {  # $1: requirements file; installs it unless a superset is already installed
  local reqs="$1" want have
  if [ ! -x venv/bin/python ]; then
    echo "==> creating venv/ with $($PY --version)"
    "$PY" -m venv venv
  fi
  want="venv/.installed-$(basename "$reqs" .txt)-$(hash_of requirements.txt "$reqs")"
  have="venv/.installed-requirements-dev-$(hash_of requirements.txt requirements-dev.txt)"
  if [ ! -f "$want" ] && [ ! -f "$have" ]; then
    echo "==> installing $reqs (exact pins; first time takes a few minutes)"
    venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    venv/bin/python -m pip install --quiet -r "$reqs"
    echo "==> warming rembg (numba compiles pymatting once, ~40 s)"
    venv/bin/python -c "import rembg" >/dev/null 2>&1 || true
    rm -f venv/.installed-*
    touch "$want"
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    ensure_venv requirements.txt
    exec venv/bin/python -m imageselector.proving.demo "$@"
    ;;
  test)
    ensure_venv requirements-dev.txt
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    exec venv/bin/python -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./run.sh demo [--listings N] [--home DIR]   |   ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
