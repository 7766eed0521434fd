#!/usr/bin/env bash
# The commands of imageselector. Needs only python3 (3.11+); everything else is set up here.
#   ./run.sh demo     create venv/, install, run the whole pipeline end to end (offline simulator
#                     when ETSY_API_KEY is unset) in a home of its own, print the status
#   ./run.sh test     create venv/ if missing, install the test tools, run the test suite
#   ./run.sh models   first run on a machine: fetch every model's weights, check each loads
#   ./run.sh lock     recompile the lock files from requirements*.txt (needs uv; maintainers only)
# Installs come from the lock file for this platform (every package pinned, with hashes):
# requirements[-dev]-macos-arm64.lock on an Apple-silicon Mac, requirements[-dev]-linux-x86_64.lock on Linux x86_64.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"

hash_of() { cat "$@" | (sha256sum 2>/dev/null || shasum -a 256) | cut -c1-16; }

lock_for() {  # $1: requirements or requirements-dev -> the lock file for this machine, or nothing
  case "$(uname -sm)" in
    "Darwin arm64") echo "$1-macos-arm64.lock" ;;
    "Linux x86_64") echo "$1-linux-x86_64.lock" ;;
    *) echo "" ;;
  esac
}

ensure_venv() {  # $1: requirements or requirements-dev; installs it unless a superset is already installed
  local base="$1" lock want have
  lock="$(lock_for "$base")"
  if [ ! -x venv/bin/python ]; then
    echo "==> creating venv/ with $($PY --version)"
    "$PY" -m venv venv
  fi
  if [ -n "$lock" ]; then
    want="venv/.installed-$base-$(hash_of "$lock")"
    have="venv/.installed-requirements-dev-$(hash_of "$(lock_for requirements-dev)")"
  else
    want="venv/.installed-$base-$(hash_of requirements.txt "$base.txt")"
    have="venv/.installed-requirements-dev-$(hash_of requirements.txt requirements-dev.txt)"
  fi
  if [ ! -f "$want" ] && [ ! -f "$have" ]; then
    venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    if [ -n "$lock" ]; then
      echo "==> installing $lock (every package pinned, hashes checked; first time takes a few minutes)"
      venv/bin/python -m pip install --quiet --require-hashes -r "$lock"
    else
      echo "==> no lock file for $(uname -sm) (locks exist for Darwin arm64 and Linux x86_64):" \
        "installing $base.txt, whose direct pins are exact but whose dependencies are not locked" >&2
      venv/bin/python -m pip install --quiet -r "$base.txt"
    fi
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
    ensure_venv requirements
    exec venv/bin/python -m imageselector.proving.demo "$@"
    ;;
  test)
    ensure_venv requirements-dev
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    exec venv/bin/python -m pytest -q "$@"
    ;;
  models)
    ensure_venv requirements
    exec venv/bin/python scripts/fetch_models.py "$@"
    ;;
  lock)
    UV="${UV:-uv}"
    for target in "macos-arm64 aarch64-apple-darwin" "linux-x86_64 x86_64-manylinux_2_28"; do
      set -- $target
      for base in requirements requirements-dev; do
        # torch's macOS wheels need macOS 14; the locks hold every wheel's hash, so any Python 3.11+ installs them
        MACOSX_DEPLOYMENT_TARGET=14.0 "$UV" pip compile --quiet --generate-hashes --python-version 3.11 \
          --python-platform "$2" --custom-compile-command "./run.sh lock" "$base.txt" -o "$base-$1.lock"
        echo "==> $base-$1.lock"
      done
    done
    ;;
  *)
    echo "usage: ./run.sh demo [--listings N] [--home DIR] | test [pytest args] | models [--only NAMES] | lock" >&2
    exit 2
    ;;
esac
