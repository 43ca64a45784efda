#!/usr/bin/env bash
# Create MONAI Label's own virtual environment and its monaibundle sample app (idempotent, offline).
#   integration/monailabel/setup.sh [VENV_DIR] [APP_DIR]
# Defaults: .venv-monailabel and .monailabel/apps/monaibundle under the repository root.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$REPO/.venv-monailabel}"
APP="${2:-$REPO/.monailabel/apps/monaibundle}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-$(cat "$HERE/constraints.txt" "$HERE/torchvision_stub/pyproject.toml" | cksum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
    echo "monailabel: creating $VENV (MONAI Label 0.8.5, CPU torch; a few minutes the first time)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # PIP_CONSTRAINT also reaches build environments (sam2 builds against torch).
    PIP_CONSTRAINT="$HERE/constraints.txt" SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --quiet "monailabel==0.8.5"
    # The registry's torchvision (pulled in by sam2) is a CUDA build that cannot be imported with the
    # CPU torch: replace it with the stand-in (no deps, so pip leaves everything else alone).
    "$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$HERE/torchvision_stub"
    touch "$STAMP"
fi
if [ ! -f "$APP/main.py" ]; then
    mkdir -p "$(dirname "$APP")"
    # `monailabel` the script runs whatever `python` is first on PATH: call the venv's python directly.
    (cd "$(dirname "$APP")" && "$VENV/bin/python" -m monailabel.main apps --download --name monaibundle --output .)
fi
echo "monailabel: venv $VENV, app $APP"
