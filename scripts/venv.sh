# Sourced by demo.sh and test.sh: create .venv (or $LIVEAVATAR_VENV), install CPU torch only when no
# torch is importable, then the given requirements file. Sets PY to the environment's python.
# pip runs only when the environment is new or the requirements files changed since the last install
# (a stamp in the environment): a warm run starts at once and needs no network.
VENV=${LIVEAVATAR_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.liveavatar-$(basename "$1").sha256"
WANT=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -r "$1"
  echo "$WANT" > "$STAMP"
fi
