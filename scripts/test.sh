#!/usr/bin/env bash
# The test suite: set up, then run pytest (fast tests; pass `-m slow` or `-m ""` for more).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
