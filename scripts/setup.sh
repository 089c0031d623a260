#!/usr/bin/env bash
# Creates .venv (Python 3.11) with torch, torchvision and align_kd (editable, with test extras).
# Idempotent: reinstalls only when pyproject.toml changed. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
stamp=.venv/.align_kd-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (first run only; log in .venv/install.log) ..."
  {
    .venv/bin/python -m pip install --upgrade pip || true
    # pinned to the releases this machine provides from its own disk (CUDA build; runs on the CPU here)
    .venv/bin/python -m pip install torch==2.14.1 torchvision==0.29.1 &&
    .venv/bin/python -m pip install -e ".[test]"
  } > .venv/install.log 2>&1 || { tail -n 40 .venv/install.log; echo "setup failed; see .venv/install.log" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# CIFAR-10: the shared JPEG archive beside the checkout, unless ALIGN_KD_DATA points elsewhere
if [ -z "${ALIGN_KD_DATA:-}" ] && [ -f ../shared/data/cifar10-jpeg.tar.gz ]; then
  ALIGN_KD_DATA="$(cd ../shared/data && pwd)/cifar10-jpeg.tar.gz"
  export ALIGN_KD_DATA
fi
