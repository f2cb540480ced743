#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs the project, then
#   ./dev.sh serve [args]   run one instance (embedded Postgres + Redis unless DATABASE_URL / REDIS_URL are set)
#   ./dev.sh test  [args]   run the test suite (uses 127.0.0.1:5432 / :6379 when they answer, embedded otherwise)
#   ./dev.sh bench NAME     run a benchmark from bench/
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test,fast,bench]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
cmd=${1:-}
shift || true
case "$cmd" in
  serve) exec .venv/bin/aframp-cache serve "$@" ;;
  migrate) exec .venv/bin/aframp-cache migrate "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  bench) name=${1:-run_all}; shift || true; exec .venv/bin/python -m "bench.$name" "$@" ;;
  *) echo "usage: ./dev.sh serve|migrate|test|bench NAME [args]" >&2; exit 2 ;;
esac
