#!/usr/bin/env bash
# Set up a virtual environment (CPU torch if none is installed) and run the end-to-end demo on a tiny
# synthetic checkpoint. Extra arguments go to `python -m liveavatar_core demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LIVEAVATAR_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -r requirements.txt
exec "$PY" -m liveavatar_core demo "$@"
