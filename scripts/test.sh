#!/usr/bin/env bash
# Set up a virtual environment with CPU torch and the test dependencies, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh requirements-test.txt
exec "$PY" -m pytest -q "$@"
