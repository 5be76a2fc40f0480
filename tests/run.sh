#!/usr/bin/env bash
# The test command: set up what is missing, lint, then run the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup.sh
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
HF_HUB_OFFLINE=1 "$PYTHON" -m pytest "$@"
