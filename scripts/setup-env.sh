#!/usr/bin/env bash
# Create (or update) the project's virtual environment .venv with dac-lake installed in editable mode.
#   scripts/setup-env.sh [EXTRAS]     e.g. scripts/setup-env.sh test,bench
# Sourced by scripts/demo and scripts/test; prints nothing but pip's errors when all is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.dac-installed-${extras:-base}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import dac_lake, ingest" || { echo "setup-env: install failed" >&2; exit 1; }
    touch "$stamp"
fi
