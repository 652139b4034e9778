#!/usr/bin/env bash
# Set up a virtual environment (CPU torch if none is installed) and run the end-to-end demo on a tiny
# synthetic checkpoint. Extra arguments go to `python -m liveavatar_core demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh requirements.txt
exec "$PY" -m liveavatar_core demo "$@"
