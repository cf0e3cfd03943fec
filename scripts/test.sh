#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh), lints (ruff; settings in pyproject.toml) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest "$@"
