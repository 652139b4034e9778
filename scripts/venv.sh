# Sourced by demo.sh and test.sh: create .venv (or $LIVEAVATAR_VENV), install CPU torch only when no
# torch is importable, then the given requirements file. Sets PY to the environment's python.
VENV=${LIVEAVATAR_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -r "$1"
