#!/usr/bin/env bash
# Run the Live Avatar pack inside a real ComfyUI server and test it end to end.
#
#   scripts/comfyui_integration.sh COMFYUI_DIR [VENV_DIR] [-- extra pytest arguments]
#
# COMFYUI_DIR  an existing ComfyUI checkout (this script never downloads ComfyUI; it is tested
#              with Comfy-Org/ComfyUI a125cd84, 0.3.64). Nothing is written into it.
# VENV_DIR     the virtual environment to create or reuse (default: $TMPDIR/liveavatar-comfy-venv).
#
# Steps:
#   1. create VENV_DIR with python3 (3.10+) unless it exists, and install into it: the torch trio
#      (TORCH_PACKAGES, default the matched PyPI trio that runs ComfyUI with --cpu; about 4 GB),
#      ComfyUI's requirements.txt, `requests` (ComfyUI imports it without listing it), this pack's
#      requirements.txt and pytest;
#   2. print the versions that matter (ComfyUI commit and version, torch, torchvision, torchaudio);
#   3. with FRONTEND_PACKAGE set (e.g. comfyui-frontend-package==1.58.1), install that frontend
#      into VENV_DIR/frontend (apart from ComfyUI's pinned one) and serve it (--front-end-root);
#   4. run tests/test_comfyui_server.py and tests/test_comfyui_browser.py with that interpreter.
#      The server test starts `main.py --cpu --listen 127.0.0.1` on a free port with a temporary
#      --base-directory (pack linked into custom_nodes as ComfyUI-LiveAvatar, fixture checkpoints
#      under models/liveavatar, inputs, output and database all inside it), checks the import log,
#      /object_info, /extensions, /workflow_templates and the example inputs, runs every example
#      workflow through /prompt, checks queue-time refusals, websocket progress and Cancel, and
#      stops the server. The browser test drives a headless Chromium (skipped when none is found;
#      Debian: apt-get install chromium): templates open without overlapping nodes, the writer
#      shows live stats and a player while it runs and the finished video after, and the
#      extension loads once.
#
# Environment: LIVEAVATAR_FIXTURES selects another fixture set (default ../shared/fixtures/
# liveavatar_tiny beside the repository); TORCH_PACKAGES overrides the torch pins; PIP_ARGS adds
# pip options (e.g. a local index); FRONTEND_PACKAGE as above; LIVEAVATAR_SCREENSHOTS a folder for
# the browser test's screenshots. Exit status is pytest's.
set -euo pipefail

usage() { sed -n '2,7p' "$0" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
COMFYUI_DIR=$(cd "$1" && pwd) || usage
shift
VENV_DIR=${TMPDIR:-/tmp}/liveavatar-comfy-venv
if [[ $# -ge 1 && $1 != "--" ]]; then VENV_DIR=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
TORCH_PACKAGES=${TORCH_PACKAGES:-"torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"}

for f in main.py requirements.txt folder_paths.py; do
    [[ -f $COMFYUI_DIR/$f ]] || { echo "error: $COMFYUI_DIR/$f is missing; pass a ComfyUI checkout." >&2; exit 2; }
done

# 1. environment
if [[ ! -x $VENV_DIR/bin/python ]]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "error: python3 must be 3.10 or newer for ComfyUI." >&2; exit 2; }
    python3 -m venv "$VENV_DIR"
fi
PY=$VENV_DIR/bin/python
# One resolver run, so ComfyUI's unpinned torch cannot replace the pinned trio.
# shellcheck disable=SC2086  # TORCH_PACKAGES and PIP_ARGS are word lists on purpose
"$PY" -m pip install ${PIP_ARGS:-} $TORCH_PACKAGES -r "$COMFYUI_DIR/requirements.txt" requests \
    -r "$REPO/requirements.txt" pytest

# 2. versions
commit=$(git -C "$COMFYUI_DIR" rev-parse HEAD 2>/dev/null || echo "not a git checkout")
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFYUI_DIR/comfyui_version.py" 2>/dev/null || true)
echo "ComfyUI $version at $COMFYUI_DIR ($commit)"
"$PY" -c 'import torch, torchvision, torchaudio; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "torchaudio", torchaudio.__version__)'

# 3. another frontend
if [[ -n ${FRONTEND_PACKAGE:-} ]]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install ${PIP_ARGS:-} --no-deps --upgrade --target "$VENV_DIR/frontend" "$FRONTEND_PACKAGE"
    export COMFYUI_FRONTEND_ROOT=$VENV_DIR/frontend/comfyui_frontend_package/static
    echo "frontend: $FRONTEND_PACKAGE ($COMFYUI_FRONTEND_ROOT)"
fi

# 4. the tests
cd "$REPO"
COMFYUI_DIR=$COMFYUI_DIR COMFYUI_PYTHON=$PY "$PY" -m pytest tests/test_comfyui_server.py \
    tests/test_comfyui_browser.py -q -rA "$@"
