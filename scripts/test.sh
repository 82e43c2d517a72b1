#!/usr/bin/env bash
# Set up the venv, then run the whole test suite (python -m pytest). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
