#!/usr/bin/env bash
# The main job: set up, then run the CIFAR-10 demo (extra arguments go to `python -m align_kd demo`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python -m align_kd demo --threads "${ALIGN_KD_THREADS:-2}" "$@"
