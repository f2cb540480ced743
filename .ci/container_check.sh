#!/usr/bin/env bash
# The container image, proven to start (issue 13, item 6). Called by .ci/run when podman can be installed.
#
#   1. podman + runc + debootstrap from Debian's packages (apt-get), /etc/containers/containers.conf for this VM
#   2. a local base image: Debian bookworm minbase + Debian's python3 (3.11), laid out like the official
#      python:3.11-slim (python, python3, pip in /usr/local/bin), the machine's CA bundle and pip config copied in;
#      cached, keyed by a hash of its recipe
#   3. the project image: podman build --format docker --build-arg BASE=<that base>
#   4. one container with the embedded default: /health/ready ok, a rate read, podman healthcheck run, podman stop < 10 s
#   5. two containers on this machine's Postgres (a fresh database) and Redis (db 12, a channel of their own), host
#      network: a rate written through one is served by the other (which had it in its L1)
#
# One line per step, then PASS or FAIL (exit 1). Exits 0 with "skipped: <why>" only when podman cannot be installed
# or cannot run here. Everything it creates (containers, volume, database, db 12's keys) is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s%N)
LOG_DIR=$(mktemp -d /tmp/aframp-container-check.XXXXXX)
RAND=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
IMAGE=localhost/aframp-cache:ci-check
C_EMB=aframp-ci-$RAND-embedded
C_A=aframp-ci-$RAND-a
C_B=aframp-ci-$RAND-b
VOLUME_NAME=aframp-ci-$RAND-data
PG_DB=aframp_container_$RAND
REDIS_DB=12                      # this check's own Redis db (the test suite uses 13); flushed before and after
PG_HOST=127.0.0.1 PG_PORT=5432 REDIS_HOST=127.0.0.1 REDIS_PORT=6379
created_db=0 created_redis=0

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
say() { printf 'container-check: %s\n' "$*"; }
step() { say "$* ($(( $(ms_since "$T0") / 1000 )) s)"; }
skip() { say "skipped: $*"; exit 0; }
failed=0
fail() {
  failed=1
  say "FAIL: $*"
  exit 1
}

cleanup() {
  local rc=$?
  set +e
  [ "$rc" = 0 ] || [ "$failed" = 1 ] || say "FAIL: stopped by an unexpected error (exit code $rc)"
  if command -v podman >/dev/null 2>&1; then
    for c in "$C_EMB" "$C_A" "$C_B"; do
      podman container exists "$c" 2>/dev/null && podman rm -f -v -t 0 "$c" >/dev/null 2>&1
    done
    podman volume exists "$VOLUME_NAME" 2>/dev/null && podman volume rm -f "$VOLUME_NAME" >/dev/null 2>&1
  fi
  if [ "$created_db" = 1 ]; then
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" \
      >/dev/null 2>&1 || say "warning: could not drop database $PG_DB"
  fi
  if [ "$created_redis" = 1 ]; then
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$REDIS_DB" FLUSHDB >/dev/null 2>&1
  fi
  if [ "$rc" = 0 ]; then rm -rf "$LOG_DIR"; else say "logs kept in $LOG_DIR"; fi
  return "$rc"
}
trap cleanup EXIT
trap 'failed=1; say "FAIL: interrupted"; exit 130' INT TERM

# A container's last lines of output, for a failure message.
show_logs() { podman logs --tail "${2:-30}" "$1" 2>&1 | sed 's/^/    | /' || true; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# http GET|PUT URL [body] [token] -> prints "<status> <X-Cache>" and leaves the body in $LOG_DIR/body
http() {
  local method=$1 url=$2 body=${3:-} token=${4:-} args=(-sS -o "$LOG_DIR/body" -D "$LOG_DIR/headers" --max-time 5)
  [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data "$body")
  [ -n "$token" ] && args+=(-H "Authorization: Bearer $token")
  local code
  code=$(curl "${args[@]}" -X "$method" -w '%{http_code}' "$url" 2>/dev/null) || code=000
  printf '%s %s\n' "$code" "$(tr -d '\r' <"$LOG_DIR/headers" 2>/dev/null | awk -F': ' 'tolower($1)=="x-cache"{print $2}')"
}

# wait_ready NAME PORT SECONDS: poll /health/ready until it answers 200 with status ok, the container must stay up
wait_ready() {
  local name=$1 port=$2 deadline=$(( $(date +%s) + $3 )) answer
  while :; do
    answer=$(http GET "http://127.0.0.1:$port/health/ready")
    if [ "${answer%% *}" = 200 ] && grep -q '"status": *"ok"' "$LOG_DIR/body"; then
      return 0
    fi
    if [ "$(podman inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
      say "container $name exited (code $(podman inspect -f '{{.State.ExitCode}}' "$name" 2>/dev/null)):"
      show_logs "$name" 40
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "container $name: /health/ready still answers ${answer%% *} $(head -c 300 "$LOG_DIR/body" 2>/dev/null)"
      show_logs "$name" 40
      return 1
    fi
    sleep 0.2
  done
}

# ------------------------------------------------------------------ 1. podman from Debian's packages
[ "$(id -u)" = 0 ] || skip "needs root (rootful podman, apt-get, debootstrap)"
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || skip "podman is not installed and there is no apt-get to install it"
  step "installing ${missing[*]} (apt-get; packages already installed are left as they are)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade \
      podman runc debootstrap curl uidmap fuse-overlayfs slirp4netns catatonit iptables ca-certificates; } \
      >"$LOG_DIR/apt.log" 2>&1; then
    tail -5 "$LOG_DIR/apt.log" | sed 's/^/    | /'
    skip "apt-get could not install podman/runc/debootstrap"
  fi
fi

# This VM needs runc (not crun) and explicit ulimits (the default nproc/nofile inheritance breaks containers here).
CONF=/etc/containers/containers.conf
WANT='# written by the aframp cache CI (.ci/container_check.sh): this VM needs runc and explicit ulimits
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"'
if [ "$(cat "$CONF" 2>/dev/null)" != "$WANT" ]; then
  mkdir -p /etc/containers
  [ -f "$CONF" ] && cp "$CONF" "$CONF.before-aframp-ci"
  printf '%s\n' "$WANT" >"$CONF"
fi
podman info >"$LOG_DIR/podman-info.log" 2>&1 || {
  tail -5 "$LOG_DIR/podman-info.log" | sed 's/^/    | /'
  skip "podman is installed but cannot run here (podman info fails)"
}
step "podman $(podman version -f '{{.Client.Version}}' 2>/dev/null), runtime $(podman info -f '{{.Host.OCIRuntime.Name}}' 2>/dev/null)"

# One check at a time on this machine (shared Redis db, cached images).
LOCK=/run/lock/aframp-container-check.lock
[ -d /run/lock ] && [ -w /run/lock ] || LOCK=/tmp/aframp-container-check.lock
exec 9>"$LOCK"
if ! flock -n 9; then
  step "waiting for another container check to finish"
  flock -w 900 9 || fail "another container check held the lock for 15 minutes"
fi

# ------------------------------------------------------------------ 2. the local base image (debootstrap)
# The Debian mirror apt uses on this machine (deb822 .sources first, then one-line .list entries).
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN{RS=""; FS="\n"}
      { types=""; uris=""; suites=""; comps=""; enabled="yes"
        for (i=1; i<=NF; i++) {
          if ($i ~ /^Types:/) types=$i; else if ($i ~ /^URIs:/) uris=$i
          else if ($i ~ /^Suites:/) suites=$i; else if ($i ~ /^Components:/) comps=$i
          else if ($i ~ /^Enabled: *no/) enabled="no" }
        if (enabled=="yes" && types ~ /[ \t]deb([ \t]|$)/ && suites ~ /[ \t]bookworm([ \t]|$)/ && comps ~ /[ \t]main([ \t]|$)/) {
          split(uris, u, /[ \t]+/); print u[2]; exit } }' "$f"
  done
  grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    sed -E 's/\[[^]]*\]//' | awk '$3=="bookworm" {print $2}' || true
}
MIRROR=$(debian_mirror | head -1) || true
[ -n "$MIRROR" ] || fail "no Debian bookworm mirror in /etc/apt/sources.list* (debootstrap needs one)"

make_base() {  # make_base ROOTFS: Debian bookworm + python3 3.11, laid out like python:3.11-slim
  local root=$1
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$MIRROR"
  # python, python3, pip, pip3 in /usr/local/bin like the official image, from a venv (Debian's own python3 is
  # "externally managed": pip refuses to install into it)
  chroot "$root" /usr/bin/python3 -m venv /usr/local/lib/python3-venv
  local n
  for n in python python3 python3.11 pip pip3 pip3.11; do
    ln -sf "/usr/local/lib/python3-venv/bin/$n" "$root/usr/local/bin/$n"
  done
  # the machine's CA bundle (and its extra CAs), and its pip settings, so the build reaches PyPI as pip does here
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
    cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  fi
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
  if [ -d /etc/xdg/pip ]; then mkdir -p "$root/etc/xdg" && cp -r /etc/xdg/pip "$root/etc/xdg/"; fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
}
host_files_hash() { cat /etc/ssl/certs/ca-certificates.crt /etc/pip.conf /etc/xdg/pip/* 2>/dev/null | sha256sum; }
RECIPE=$( { declare -f make_base; echo "$MIRROR"; uname -m; host_files_hash; } | sha256sum | cut -c1-12)
BASE=localhost/aframp-ci-base:bookworm-py311-$RECIPE
if podman image exists "$BASE"; then
  step "base image $BASE (cached)"
else
  step "making base image $BASE with debootstrap"
  ROOTFS=$(mktemp -d /var/tmp/aframp-ci-rootfs.XXXXXX)
  if ! (make_base "$ROOTFS") >"$LOG_DIR/debootstrap.log" 2>&1; then
    tail -15 "$LOG_DIR/debootstrap.log" | sed 's/^/    | /'
    rm -rf "$ROOTFS"
    fail "debootstrap of the base image failed"
  fi
  tar --numeric-owner -C "$ROOTFS" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >>"$LOG_DIR/debootstrap.log" 2>&1 ||
    fail "podman import of the base image failed"
  rm -rf "$ROOTFS"
fi
[ "$(podman run --rm --network none "$BASE" python -c 'import sys; print(sys.version_info[:2] >= (3, 11))')" = True ] ||
  fail "the base image has no python >= 3.11 on PATH"

# ------------------------------------------------------------------ 3. the project image
step "building $IMAGE (podman build --format docker --build-arg BASE=$BASE)"
t=$(date +%s%N)
# host network: pip in the build reaches PyPI exactly as it does on this machine. The build stage is tagged too, so
# its layers (the locked install) stay cached when older images are cleared away below.
for target in build ""; do
  if ! podman build --format docker --network host --build-arg "BASE=$BASE" ${target:+--target "$target"} \
      -t "$IMAGE${target:+-$target}" -f Dockerfile . >>"$LOG_DIR/build.log" 2>&1; then
    grep -v '^WARNING: Location' "$LOG_DIR/build.log" | tail -25 | sed 's/^/    | /'
    fail "podman build failed"
  fi
done
# Earlier builds' images (untagged now) and earlier recipes' bases are not needed any more: remove the untagged images
# built on any aframp-ci-base (a removed child can leave its parent untagged, hence the passes), then the old bases.
old_bases=$(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/aframp-ci-base:' | grep -vx "$BASE" || true)
base_layers=$(for b in "$BASE" $old_bases; do podman image inspect -f '{{index .RootFS.Layers 0}}' "$b"; done)
for _ in 1 2 3 4 5 6 7 8 9 10; do
  removed=0
  for id in $(podman images -a -q --no-trunc --filter dangling=true 2>/dev/null | sort -u); do
    if podman image inspect -f '{{range .RootFS.Layers}}{{.}} {{end}}' "$id" 2>/dev/null | grep -qF "$base_layers" &&
        podman rmi "$id" >/dev/null 2>&1; then
      removed=1
    fi
  done
  [ "$removed" = 1 ] || break
done
for b in $old_bases; do podman rmi "$b" >/dev/null 2>&1 || true; done
step "built in $(( $(ms_since "$t") / 1000 )) s: $(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'), user $(podman image inspect -f '{{.Config.User}}' "$IMAGE")"

# ------------------------------------------------------------------ 4. the embedded default
# stop_timed NAME: podman stop (SIGTERM, SIGKILL after 10 s); fails unless it took < 10 s and the service exited 0
stop_timed() {
  local t ms code
  t=$(date +%s%N)
  podman stop -t 10 "$1" >/dev/null 2>>"$LOG_DIR/podman.log" || fail "podman stop $1 failed"
  ms=$(ms_since "$t")
  code=$(podman inspect -f '{{.State.ExitCode}}' "$1")
  [ "$ms" -lt 10000 ] || { show_logs "$1" 20; fail "podman stop $1 took $ms ms (limit 10 s)"; }
  [ "$code" = 0 ] || { show_logs "$1" 20; fail "$1 exited with code $code on SIGTERM"; }
  STOP_MS=$ms
}
# run_embedded NAME PORT: the image as a user would run it: published port, the data volume, nothing else but a token
run_embedded() {
  # (without systemd podman cannot schedule the HEALTHCHECK's timer and says so on stderr: that goes to the log;
  # `podman healthcheck run` below runs the check itself)
  podman run -d --name "$1" -p "127.0.0.1:$2:8080" -v "$VOLUME_NAME:/data" -e ADMIN_TOKEN="$TOKEN" "$IMAGE" \
    >/dev/null 2>>"$LOG_DIR/podman.log" || { tail -5 "$LOG_DIR/podman.log"; fail "podman run $1 failed"; }
}
TOKEN=ci-$RAND-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
P=$(free_port)
podman volume create "$VOLUME_NAME" >/dev/null
run_embedded "$C_EMB" "$P"
t=$(date +%s%N)
wait_ready "$C_EMB" "$P" 180 || fail "the embedded-default container did not become ready"
step "embedded default: /health/ready 200 ok after $(ms_since "$t") ms: $(head -c 200 "$LOG_DIR/body")"

answer=$(http GET "http://127.0.0.1:$P/v1/rates/CNGN/USD")
[ "${answer%% *}" = 200 ] && grep -q '"source": *"demo"' "$LOG_DIR/body" ||
  fail "GET /v1/rates/CNGN/USD answered $answer: $(head -c 300 "$LOG_DIR/body")"
step "rate read: GET /v1/rates/CNGN/USD 200, X-Cache ${answer#* }: $(head -c 200 "$LOG_DIR/body")"

podman healthcheck run "$C_EMB" >"$LOG_DIR/healthcheck.log" 2>&1 ||
  fail "podman healthcheck run: $(cat "$LOG_DIR/healthcheck.log")"
step "podman healthcheck run: exit 0, health $(podman inspect -f '{{.State.Health.Status}}' "$C_EMB" 2>/dev/null || echo '?')"

who=$(podman exec "$C_EMB" sh -c 'echo "$(id -un) $(stat -c %U /data) $(stat -c %U /data/postgres)"' 2>/dev/null || echo '?')
[ "$who" = "aframp aframp aframp" ] ||
  fail "user / owner of /data / owner of /data/postgres: '$who' (expected aframp for all three)"
step "runs as aframp (uid $(podman exec "$C_EMB" id -u)); /data and its embedded Postgres are aframp's"

# a write to the embedded Postgres, which must outlive the container (the data dir is a volume)
R0=0.000$RANDOM$RANDOM
answer=$(http PUT "http://127.0.0.1:$P/v1/rates/CNGN/USD" "{\"rate\": \"$R0\", \"source\": \"manual\"}" "$TOKEN")
[ "${answer%% *}" = 200 ] || fail "PUT /v1/rates/CNGN/USD answered $answer: $(head -c 300 "$LOG_DIR/body")"

stop_timed "$C_EMB"
step "podman stop: $STOP_MS ms, exit code 0"
podman rm -f -v "$C_EMB" >/dev/null 2>>"$LOG_DIR/podman.log"

run_embedded "$C_EMB" "$P"
t=$(date +%s%N)
wait_ready "$C_EMB" "$P" 180 || fail "a new container on the same volume did not become ready"
answer=$(http GET "http://127.0.0.1:$P/v1/rates/CNGN/USD")
[ "${answer%% *}" = 200 ] && grep -q "\"$R0\"" "$LOG_DIR/body" ||
  fail "a new container on the volume does not serve the rate written before: $answer $(head -c 300 "$LOG_DIR/body")"
stop_timed "$C_EMB"
step "a new container on the same volume: ready after $(ms_since "$t") ms, serves the rate written before ($R0); stop $STOP_MS ms"
podman rm -f -v "$C_EMB" >/dev/null 2>>"$LOG_DIR/podman.log"

# ------------------------------------------------------------------ 5. two containers, one Postgres and one Redis
(exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null || fail "no Postgres on $PG_HOST:$PG_PORT"
(exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT") 2>/dev/null || fail "no Redis on $REDIS_HOST:$REDIS_PORT"
command -v psql >/dev/null 2>&1 || fail "psql is needed to create the test database"
command -v redis-cli >/dev/null 2>&1 || fail "redis-cli is needed to clear Redis db $REDIS_DB"
psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qAtc "CREATE DATABASE $PG_DB" >/dev/null ||
  fail "could not create database $PG_DB"
created_db=1
created_redis=1
redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$REDIS_DB" FLUSHDB >/dev/null
PA=$(free_port)
PB=$(free_port)
while [ "$PB" = "$PA" ]; do PB=$(free_port); done
for pair in "$C_A:$PA" "$C_B:$PB"; do
  podman run -d --name "${pair%%:*}" --network host \
    -e HOST=127.0.0.1 -e PORT="${pair##*:}" -e INSTANCE_ID="${pair%%:*}" -e ADMIN_TOKEN="$TOKEN" \
    -e DATABASE_URL="postgresql://postgres@$PG_HOST:$PG_PORT/$PG_DB" \
    -e REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT/$REDIS_DB" -e REDIS_CHANNEL="aframp:v2:ci-container-$RAND" \
    "$IMAGE" >/dev/null 2>>"$LOG_DIR/podman.log" || { tail -5 "$LOG_DIR/podman.log"; fail "podman run ${pair%%:*} failed"; }
done
t=$(date +%s%N)
wait_ready "$C_A" "$PA" 120 || fail "instance a did not become ready"
wait_ready "$C_B" "$PB" 120 || fail "instance b did not become ready"
step "two instances on Postgres $PG_DB and Redis db $REDIS_DB: both ready after $(ms_since "$t") ms (ports $PA, $PB)"

A=http://127.0.0.1:$PA B=http://127.0.0.1:$PB
R1=0.000$RANDOM$RANDOM R2=0.000$RANDOM$RANDOM
while [ "$R2" = "$R1" ]; do R2=0.000$RANDOM$RANDOM; done
answer=$(http PUT "$A/v1/rates/CNGN/USD" "{\"rate\": \"$R1\", \"source\": \"manual\"}" "$TOKEN")
[ "${answer%% *}" = 200 ] || fail "PUT through a answered $answer: $(head -c 300 "$LOG_DIR/body")"
http GET "$B/v1/rates/CNGN/USD" >/dev/null
answer=$(http GET "$B/v1/rates/CNGN/USD")
[ "${answer%% *}" = 200 ] && grep -q "\"$R1\"" "$LOG_DIR/body" ||
  fail "b does not serve the first rate: $answer $(head -c 300 "$LOG_DIR/body")"
[ "${answer#* }" = L1 ] || fail "b's second read of the rate was not from its L1 (X-Cache ${answer#* })"
step "b serves rate $R1 from its L1"

answer=$(http PUT "$A/v1/rates/CNGN/USD" "{\"rate\": \"$R2\", \"source\": \"manual\"}" "$TOKEN")
t=$(date +%s%N)
[ "${answer%% *}" = 200 ] || fail "PUT through a answered $answer: $(head -c 300 "$LOG_DIR/body")"
reads=0
while :; do
  answer=$(http GET "$B/v1/rates/CNGN/USD")
  reads=$((reads + 1))
  if [ "${answer%% *}" = 200 ] && grep -q "\"$R2\"" "$LOG_DIR/body"; then break; fi
  [ "$(ms_since "$t")" -lt 5000 ] || fail "b still serves $(head -c 200 "$LOG_DIR/body") 5 s after the write through a"
  sleep 0.01
done
seen_ms=$(ms_since "$t")
step "write through a seen by b: $R2 after $seen_ms ms (read $reads, X-Cache ${answer#* })"
[ "$reads" = 1 ] || say "note: b's first read after the answered write still served the old value"
[ "$seen_ms" -le 100 ] || say "note: later than the coherence bound B = 100 ms (the time includes starting curl on a busy machine)"

stop_timed "$C_A"
a_ms=$STOP_MS
stop_timed "$C_B"
step "both stopped: $a_ms ms, $STOP_MS ms"

say "PASS in $(( $(ms_since "$T0") / 1000 )) s"
