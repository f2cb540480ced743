#!/usr/bin/env bash
# Static checks of the product: mypy --strict over service, actors and tiers (.mypy.ini), then the per-module
# import test (every module imports on its own in a fresh interpreter, starting nothing) and the typed-ask check.
# Non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m mypy --config-file .mypy.ini
"$PY" -m pytest -q -p no:cacheprovider tests/test_imports.py tests/test_typed_ask.py
