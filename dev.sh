#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs what the command needs from the lock files
# (exact versions with hashes, the set the tests passed with), then
#   ./dev.sh serve [args]   run one instance (embedded Postgres + Redis unless DATABASE_URL / REDIS_URL are set)
#   ./dev.sh test  [args]   run the test suite (uses 127.0.0.1:5432 / :6379 when they answer, embedded otherwise)
#   ./dev.sh bench NAME     run a benchmark from bench/
#   ./dev.sh migrate        apply the schema migrations and exit
#   ./dev.sh lock           regenerate requirements*.lock from pyproject.toml (pip-compile --generate-hashes)
# serve/migrate install requirements.lock (the service alone), test requirements-test.lock (+ the test extra and
# the libraries the suite's benchmark smoke tests import), bench requirements-bench.lock (+ the bench extra).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

install() {  # install one lock file (once per content), then the project itself without dependencies
  local lock=$1 stamp
  stamp=.venv/.installed-$(cat "$lock" pyproject.toml | sha1sum | cut -c1-12)-${lock%.lock}
  if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --require-hashes -r "$lock"
    .venv/bin/python -m pip install -q --no-deps -e .
    rm -f .venv/.installed-*-"${lock%.lock}"
    touch "$stamp"
  fi
}

lock() {  # pip-compile every lock file; the header of each names this command
  .venv/bin/python -m pip install -q pip-tools
  export CUSTOM_COMPILE_COMMAND="./dev.sh lock"
  local common=(--quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links)
  .venv/bin/pip-compile "${common[@]}" -o requirements.lock pyproject.toml
  .venv/bin/pip-compile "${common[@]}" --extra test --extra bench --extra fast -o requirements-test.lock pyproject.toml
  .venv/bin/pip-compile "${common[@]}" --extra bench --extra fast -o requirements-bench.lock pyproject.toml
  local f
  for f in requirements.lock requirements-test.lock requirements-bench.lock; do
    { echo "# Exact versions with hashes, the set the tests passed with. Regenerate after changing pyproject.toml:"
      echo "#   ./dev.sh lock   (pip-compile --generate-hashes --allow-unsafe --strip-extras, see dev.sh)"
      echo "# Install: pip install --require-hashes -r $f && pip install --no-deps ."
      cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
  done
}

cmd=${1:-}
shift || true
case "$cmd" in
  serve) install requirements.lock; exec .venv/bin/aframp-cache serve "$@" ;;
  migrate) install requirements.lock; exec .venv/bin/aframp-cache migrate "$@" ;;
  test)
    install requirements-test.lock
    set +e
    .venv/bin/python -m pytest -q "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "dev.sh test: pytest collected no tests" >&2; fi
    exit "$rc" ;;
  bench) install requirements-bench.lock; name=${1:-run_all}; shift || true; exec .venv/bin/python -m "bench.$name" "$@" ;;
  lock) lock ;;
  *) echo "usage: ./dev.sh serve|migrate|test|bench NAME|lock [args]" >&2; exit 2 ;;
esac
