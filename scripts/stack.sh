#!/usr/bin/env bash
# Local stack of REAL services for development and CI:
#   Kafka (KRaft, single node) . PostgreSQL . Redis . the Beam Prism runner binary.
#
# Usage: scripts/stack.sh up|down|status
#        scripts/stack.sh stop|start redis|postgres|kafka     one service of the stack
#        scripts/stack.sh instance up|down|purge|status redis|postgres|kafka PORT
#                                                             an extra, private server
#
# Everything (jars, data, logs, pid files, binaries) lives in <repo>/.stack/.
# Servers listen on 127.0.0.1 only. Installs what is missing (apt, Maven Central,
# Go module proxy), so a fresh machine only needs root, java/mvn and go.
#
# stop/start take one service of the stack away and bring it back (outage
# drills): Redis is stopped with SHUTDOWN SAVE and starts from that snapshot,
# Postgres stops with pg_ctl -m fast (clients are disconnected), Kafka with a
# controlled shutdown; data is kept. `down` then `up` still starts Redis empty.
#
# An instance is another redis-server, PostgreSQL cluster or Kafka broker on
# PORT, with its own data, log and pid under .stack/instances/<service>-<port>/,
# for tests that stop a server without touching the shared one (the stack's own
# ports are refused). Postgres instances get the role/database `analytics`
# (password `analytics`) and schemas/postgres.sql, like the stack's; a Kafka
# instance (its controller on PORT+1) starts without topics. `down` keeps the
# data (Redis as a snapshot, as `stop` does), `purge` stops and deletes it.
# Every verb is idempotent and every wait is bounded.
#
# Env overrides: KAFKA_VERSION (default: 4.1.1, falling back to 4.4.0),
#   KAFKA_PORT=9092 KAFKA_CONTROLLER_PORT=9093 PGPORT=5432 REDIS_PORT=6379
#   BEAM_VERSION (default: read from setup.py) PYTHON=python3
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="$ROOT/.stack"
LOGS="$STACK/logs"

KAFKA_VERSION="${KAFKA_VERSION:-}"          # empty: try the candidates below in order
KAFKA_CANDIDATES="4.1.1 4.4.0"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
PGPORT="${PGPORT:-5432}"
REDIS_PORT="${REDIS_PORT:-6379}"
PYTHON="${PYTHON:-python3}"

KAFKA_DIR="$STACK/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
PG_DIR="$STACK/pg"
PG_DATA="$PG_DIR/data"
REDIS_DIR="$STACK/redis"
REDIS_PID="$REDIS_DIR/redis.pid"
PRISM_BIN="$STACK/bin/prism"

PG_DSN="postgresql://analytics:analytics@127.0.0.1:${PGPORT}/analytics"
PG_LOG="$LOGS/postgres.log"
PG_SCHEMA_LOG="$LOGS/postgres-schema.log"
REDIS_LOG="$LOGS/redis.log"
KAFKA_LOG="$LOGS/kafka.log"
KAFKA_FORMAT_LOG="$LOGS/kafka-format.log"
INSTANCES="$STACK/instances"
# The stack's own ports: an extra instance may not take them.
MAIN_PORTS="$KAFKA_PORT $KAFKA_CONTROLLER_PORT $PGPORT $REDIS_PORT"

# ---------------------------------------------------------------- error handling
# Every unit of work is a "step"; on any failure we say which step, why, and show
# the tail of the log that step writes to, then exit non-zero.
STEP="startup"
STEP_LOG=""

step() { STEP="$1"; STEP_LOG="${2:-}"; echo "==> $STEP"; }

fail() {
  trap - ERR
  echo "stack.sh: FAILED at step '$STEP': $*" >&2
  if [[ -n $STEP_LOG && -s $STEP_LOG ]]; then
    echo "----- last 40 lines of $STEP_LOG -----" >&2
    tail -n 40 "$STEP_LOG" >&2
    echo "-----" >&2
  fi
  exit 1
}

on_err() { fail "command '$BASH_COMMAND' exited with status $1 (line $2)"; }
trap 'on_err $? $LINENO' ERR

# ---------------------------------------------------------------- small helpers
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# pid_running PIDFILE CMDLINE_SUBSTRING: alive AND really ours (guards against pid reuse)
pid_running() {
  local pid
  [[ -s $1 ]] || return 1
  pid="$(<"$1")"
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

# stop_pid PIDFILE NAME SECONDS: TERM, wait (bounded), then KILL
stop_pid() {
  local pidfile=$1 name=$2 secs=$3 pid i
  pid="$(<"$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < secs; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; echo "    $name stopped"; return 0; }
    sleep 1
  done
  echo "    $name did not stop within ${secs}s; sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 1
  rm -f "$pidfile"
}

need_root() { [[ $EUID -eq 0 ]] || fail "must run as root ($1)"; }

APT_UPDATED=0
apt_install() {
  need_root "apt-get install $*"
  local log="$LOGS/apt.log"
  echo "    apt-get install $* (log: $log)"
  if ((APT_UPDATED == 0)); then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 || fail "apt-get update failed (see $log)"
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1 \
    || fail "apt-get install $* failed (see $log)"
}

beam_version() {
  if [[ -n ${BEAM_VERSION:-} ]]; then echo "$BEAM_VERSION"; return; fi
  local v=""
  if [[ -f $ROOT/setup.py ]]; then v="$(sed -nE 's/^BEAM_VERSION[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' "$ROOT/setup.py" | head -n1)"; fi
  echo "${v:-2.75.0}"
}

python_deps() {
  # create_topics.py needs the Kafka client and schemas/ (the topic list), which needs fastavro.
  step "python: confluent-kafka, fastavro" "$LOGS/pip.log"
  if ! "$PYTHON" -c 'import confluent_kafka, fastavro' 2>/dev/null; then
    "$PYTHON" -m pip install -q confluent-kafka fastavro >>"$LOGS/pip.log" 2>&1 \
      || fail "pip install confluent-kafka fastavro failed"
  fi
}

# ---------------------------------------------------------------- kafka
kafka_java_opts() {
  echo "-Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true" \
       "-Dlog4j2.configurationFile=$ROOT/scripts/kafka/log4j2.properties -Dkafka.logs.dir=$LOGS"
}

kafka_fetch() {
  step "kafka: jars from Maven Central" "$LOGS/mvn.log"
  local marker="$KAFKA_LIBS/.complete" v
  # Marker holds the version; it is written only after a full, successful copy.
  if [[ -s $marker ]] && [[ -z $KAFKA_VERSION || $(<"$marker") == "$KAFKA_VERSION" ]]; then
    KAFKA_VERSION="$(<"$marker")"
    echo "    kafka $KAFKA_VERSION jars present"
    return
  fi
  if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    apt_install openjdk-17-jre-headless maven
  fi
  for v in ${KAFKA_VERSION:-$KAFKA_CANDIDATES}; do
    echo "    mvn dependency:copy-dependencies kafka $v"
    rm -rf "$KAFKA_LIBS"
    if mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
         -DoutputDirectory="$KAFKA_LIBS" -Dkafka.version="$v" >>"$LOGS/mvn.log" 2>&1 \
       && [[ -f $KAFKA_LIBS/kafka_2.13-$v.jar ]]; then
      echo "$v" >"$marker"
      KAFKA_VERSION="$v"
      return
    fi
    echo "    kafka $v did not resolve"
  done
  fail "could not fetch Kafka jars for version(s): ${KAFKA_VERSION:-$KAFKA_CANDIDATES}"
}

kafka_format() {
  step "kafka: format KRaft storage" "$KAFKA_FORMAT_LOG"
  mkdir -p "$KAFKA_DIR/data"
  # Rendered on every up so port overrides take effect.
  sed -e "s|@DATA_DIR@|$KAFKA_DIR/data|g" \
      -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" \
      -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
      "$ROOT/scripts/kafka/server.properties" >"$KAFKA_PROPS"
  if [[ -f $KAFKA_DIR/data/meta.properties ]]; then
    echo "    already formatted (cluster id $(<"$KAFKA_DIR/cluster.id"))"
    return
  fi
  # One cluster id for the life of .stack/, so a re-format matches old data.
  if [[ ! -s $KAFKA_DIR/cluster.id ]]; then
    # shellcheck disable=SC2046
    java $(kafka_java_opts) -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid \
      2>>"$KAFKA_FORMAT_LOG" | tail -n1 >"$KAFKA_DIR/cluster.id"
    [[ -s $KAFKA_DIR/cluster.id ]] || fail "StorageTool random-uuid printed nothing"
  fi
  # --standalone: single-node dynamic quorum (we set controller.quorum.bootstrap.servers,
  # not controller.quorum.voters; the two styles need different format flags).
  # shellcheck disable=SC2046
  java $(kafka_java_opts) -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format \
    --config "$KAFKA_PROPS" --cluster-id "$(<"$KAFKA_DIR/cluster.id")" --standalone \
    >>"$KAFKA_FORMAT_LOG" 2>&1
  echo "    formatted with cluster id $(<"$KAFKA_DIR/cluster.id")"
}

# Does the broker answer a metadata request (not just accept TCP)?
kafka_answers() {
  "$PYTHON" - "127.0.0.1:$KAFKA_PORT" <<'PY' >/dev/null 2>&1
import sys
from confluent_kafka.admin import AdminClient
md = AdminClient({"bootstrap.servers": sys.argv[1]}).list_topics(timeout=5)
sys.exit(0 if md.brokers else 1)
PY
}

kafka_up() {
  kafka_fetch
  kafka_format
  step "kafka: start broker on 127.0.0.1:$KAFKA_PORT" "$KAFKA_LOG"
  if pid_running "$KAFKA_PID" kafka.Kafka; then
    echo "    already running (pid $(<"$KAFKA_PID"))"
  else
    local p
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
      if port_open "$p"; then fail "port $p is already taken by another process (not our broker)"; fi
    done
    echo "---- $(date -Is) starting kafka $KAFKA_VERSION" >>"$KAFKA_LOG"
    # setsid+nohup: the broker outlives this script and the caller's terminal.
    # shellcheck disable=SC2046
    nohup setsid java $(kafka_java_opts) -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
      >>"$KAFKA_LOG" 2>&1 </dev/null 9>&- &
    echo $! >"$KAFKA_PID"
  fi
  local i
  for ((i = 0; i < 60; i++)); do
    # kill -0, not pid_running: right after the fork the child may not have exec'd java yet.
    kill -0 "$(<"$KAFKA_PID")" 2>/dev/null || fail "broker process exited during startup"
    if port_open "$KAFKA_PORT" && kafka_answers; then
      echo "    broker up (pid $(<"$KAFKA_PID"), ${i}s)"
      return
    fi
    sleep 1
  done
  fail "broker did not answer on 127.0.0.1:$KAFKA_PORT within 60s (if it was started with other ports, run 'scripts/stack.sh down' first)"
}

kafka_topics() {
  step "kafka: create topics" "$LOGS/topics.log"
  KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT" "$PYTHON" "$ROOT/scripts/create_topics.py" 2>&1 \
    | tee -a "$LOGS/topics.log" | sed 's/^/    /'
}

kafka_down() {
  step "kafka: stop" "$KAFKA_LOG"
  if pid_running "$KAFKA_PID" kafka.Kafka; then
    stop_pid "$KAFKA_PID" kafka 60   # controlled shutdown flushes logs; give it time
  else
    rm -f "$KAFKA_PID"
    echo "    not running"
  fi
}

# ---------------------------------------------------------------- postgres
PG_BIN=""
PG_SOCK=""

pg_find_bin() {
  PG_BIN="$(find /usr/lib/postgresql -maxdepth 3 -path '*/bin/postgres' 2>/dev/null | sort -V | tail -n1)"
  PG_BIN="${PG_BIN%/postgres}"
}

pg_sock_dir() {
  # Unix socket paths are limited to 107 bytes; deep checkouts fall back to /tmp.
  PG_SOCK="$PG_DIR/run"
  if (( ${#PG_SOCK} + 20 > 107 )); then
    PG_SOCK="/tmp/stack-pg-$(echo "$ROOT" | md5sum | cut -c1-10)"
  fi
}

as_pg() { runuser -u postgres -- "$@"; }

pg_cluster_running() { [[ -f $PG_DATA/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

pg_install() {
  step "postgres: install" "$LOGS/apt.log"
  pg_find_bin
  if [[ -z $PG_BIN ]]; then
    apt_install postgresql
    pg_find_bin
    [[ -n $PG_BIN ]] || fail "postgresql installed but no /usr/lib/postgresql/*/bin/postgres"
  fi
  echo "    $("$PG_BIN/postgres" --version)"
}

pg_init() {
  need_root "postgres runs as the postgres OS user via runuser"
  step "postgres: init project cluster in $PG_DATA" "$PG_LOG"
  pg_sock_dir
  mkdir -p "$PG_DIR" "$PG_SOCK"
  chown postgres:postgres "$PG_DIR" "$PG_SOCK"
  # postgres (not root) must be able to walk down to .stack/pg: add search-only (o+x)
  # permission on any ancestor that lacks it.
  local d="$PG_DIR"
  while [[ $d != / ]]; do
    if ! as_pg test -x "$d"; then
      chmod o+x "$d"
      echo "    note: chmod o+x $d so the postgres user can reach $PG_DIR"
    fi
    d="$(dirname "$d")"
  done
  touch "$PG_LOG" && chown postgres:postgres "$PG_LOG"

  if [[ -f $PG_DATA/PG_VERSION ]]; then
    local have want
    have="$(<"$PG_DATA/PG_VERSION")"
    want="$("$PG_BIN/postgres" --version | sed -E 's/.* ([0-9]+)(\.[0-9]+)*.*/\1/')"
    [[ $have == "$want" ]] || fail "$PG_DATA is a PostgreSQL $have cluster but the server is $want; remove $PG_DATA to re-create it"
    echo "    already initialised (PostgreSQL $have)"
  else
    rm -rf "$PG_DATA"
    # trust auth is acceptable: the server only listens on loopback + a private socket dir.
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" --username=postgres --auth=trust \
      --encoding=UTF8 --locale=C.UTF-8 >>"$PG_LOG" 2>&1
    echo "include_if_exists = 'stack.conf'" >>"$PG_DATA/postgresql.conf"
  fi
}

# Settings live in a file (not pg_ctl -o) so a plain `pg_ctl restart` keeps them.
# Written just before each start, never under a running server.
pg_write_conf() {
  cat >"$PG_DATA/stack.conf" <<EOF
# Written by scripts/stack.sh before each start.
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$PG_SOCK'
EOF
  chown postgres:postgres "$PG_DATA/stack.conf"
}

# Free our port from Debian's default cluster if it holds it (apt may start it).
pg_free_port() {
  port_open "$PGPORT" || return 0
  local ver name port status
  if command -v pg_lsclusters >/dev/null; then
    while read -r ver name port status _; do
      if [[ $port == "$PGPORT" && $status == online* ]]; then
        echo "    note: stopping Debian's default cluster $ver/$name, it holds port $PGPORT (pg_ctlcluster $ver $name stop)"
        pg_ctlcluster "$ver" "$name" stop >>"$PG_LOG" 2>&1 || true
      fi
    done < <(pg_lsclusters -h 2>/dev/null)
  fi
  sleep 1
  if port_open "$PGPORT"; then fail "port $PGPORT is taken by another process; stop it or set PGPORT"; fi
}

pg_up() {
  pg_install
  pg_init
  step "postgres: start on 127.0.0.1:$PGPORT" "$PG_LOG"
  if pg_cluster_running; then
    local running_port
    running_port="$(as_pg sed -n 4p "$PG_DATA/postmaster.pid")"
    if [[ $running_port != "$PGPORT" ]]; then
      fail "the project cluster is already running on port $running_port, not $PGPORT; run 'scripts/stack.sh down' first"
    fi
    echo "    already running"
  else
    pg_free_port
    pg_write_conf
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 9>&-
  fi
  "$PG_BIN/pg_isready" -q -U postgres -h 127.0.0.1 -p "$PGPORT" -t 30 || fail "server not accepting connections on 127.0.0.1:$PGPORT"

  step "postgres: role + database 'analytics'" "$PG_LOG"
  "$PG_BIN/psql" -h "$PG_SOCK" -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt <<'SQL' >>"$PG_LOG" 2>&1
SELECT 'CREATE ROLE analytics LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'analytics') \gexec
ALTER ROLE analytics LOGIN PASSWORD 'analytics';
SELECT 'CREATE DATABASE analytics OWNER analytics' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'analytics') \gexec
SQL

  if [[ -f $ROOT/schemas/postgres.sql ]]; then
    step "postgres: apply schemas/postgres.sql" "$PG_SCHEMA_LOG"
    "$PG_BIN/psql" "$PG_DSN" -v ON_ERROR_STOP=1 -q -f "$ROOT/schemas/postgres.sql" >>"$PG_SCHEMA_LOG" 2>&1
    echo "    applied"
  else
    echo "    (no schemas/postgres.sql yet; skipping DDL)"
  fi
}

pg_down() {
  step "postgres: stop" "$PG_LOG"
  pg_find_bin
  if [[ -n $PG_BIN ]] && pg_cluster_running; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null \
      || as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate -w -t 30 stop >/dev/null
    echo "    postgres stopped"
  else
    echo "    not running"
  fi
}

# ---------------------------------------------------------------- redis
redis_up() {
  step "redis: install" "$LOGS/apt.log"
  command -v redis-server >/dev/null || apt_install redis-server
  echo "    $(redis-server --version | cut -d' ' -f1-3)"

  step "redis: start on 127.0.0.1:$REDIS_PORT" "$REDIS_LOG"
  mkdir -p "$REDIS_DIR"
  if pid_running "$REDIS_PID" redis-server; then
    echo "    already running (pid $(<"$REDIS_PID"))"
  else
    if port_open "$REDIS_PORT"; then
      # Debian's package may have started its own service on 6379.
      if [[ $REDIS_PORT == 6379 && -s /run/redis/redis-server.pid ]] && command -v service >/dev/null; then
        echo "    note: stopping Debian's redis-server service, it holds port $REDIS_PORT"
        service redis-server stop >>"$REDIS_LOG" 2>&1 || true
        sleep 1
      fi
      if port_open "$REDIS_PORT"; then fail "port $REDIS_PORT is taken by another process; stop it or set REDIS_PORT"; fi
    fi
    # Append-only file, synced at every write: Redis holds the real-time
    # values, and a window that gets no new pane is never written again, so a
    # crash of Redis must not lose what it acknowledged.
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
      --dir "$REDIS_DIR" --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" \
      --save '' --appendonly yes --appendfsync always 9>&-
  fi
  local i
  for ((i = 0; i < 20; i++)); do
    [[ $(redis_ping) == PONG ]] && { echo "    PONG"; return; }
    sleep 1
  done
  fail "redis did not answer PING on 127.0.0.1:$REDIS_PORT within 20s (if it was started on another port, run 'scripts/stack.sh down' first)"
}

redis_ping() { timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null || true; }

redis_down() {
  step "redis: stop" "$REDIS_LOG"
  if pid_running "$REDIS_PID" redis-server; then
    stop_pid "$REDIS_PID" redis 15   # SIGTERM = clean shutdown (nothing to save)
  else
    rm -f "$REDIS_PID"
    echo "    not running"
  fi
  rm -f "$REDIS_DIR/dump.rdb"        # `up` after `down` starts empty, as it always did
}

# Stops Redis keeping its data: SHUTDOWN SAVE writes dump.rdb, which the next start loads.
redis_stop_saving() {
  step "redis: stop on 127.0.0.1:$REDIS_PORT (saving a snapshot)" "$REDIS_LOG"
  if ! pid_running "$REDIS_PID" redis-server; then
    rm -f "$REDIS_PID"
    echo "    not running"
    return
  fi
  local pid i
  pid="$(<"$REDIS_PID")"
  timeout 20 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown save >/dev/null 2>&1 || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$REDIS_PID"; echo "    redis stopped (snapshot in $REDIS_DIR/dump.rdb)"; return; }
    sleep 0.2
  done
  echo "    SHUTDOWN SAVE did not stop redis within 20s"
  stop_pid "$REDIS_PID" redis 10
}

# ---------------------------------------------------------------- prism
# Module version baked into a Go binary, e.g. v2.75.0 (empty if unknown).
prism_version() {
  command -v go >/dev/null || return 0
  go version -m "$1" 2>/dev/null | awk '$1 == "mod" && $2 == "github.com/apache/beam/sdks/v2" {print $3}'
}

prism_build() {
  local want
  want="v$(beam_version)"
  step "prism: $want binary" "$LOGS/prism-build.log"
  if [[ -x $PRISM_BIN ]]; then
    local have
    have="$(prism_version "$PRISM_BIN")"
    if [[ -z $have || $have == "$want" ]]; then
      echo "    present: $PRISM_BIN ${have:-(version unknown: no go toolchain)}"
      return
    fi
    echo "    $PRISM_BIN is $have, want $want: rebuilding"
  fi
  command -v go >/dev/null || fail "go is not installed (needed to build prism); Debian's golang is too old, install Go >= 1.23"
  mkdir -p "$STACK/bin"
  # Reuse an identical build already in GOPATH/bin (go install of the same version).
  local gobin_prism
  gobin_prism="$(go env GOPATH)/bin/prism"
  if [[ -x $gobin_prism && $(prism_version "$gobin_prism") == "$want" ]]; then
    cp "$gobin_prism" "$PRISM_BIN"
    echo "    copied $gobin_prism ($want)"
    return
  fi
  echo "    go install github.com/apache/beam/sdks/v2/go/cmd/prism@$want (several minutes on a cold machine)"
  local t0=$SECONDS
  GOBIN="$STACK/bin" go install "github.com/apache/beam/sdks/v2/go/cmd/prism@$want" >>"$LOGS/prism-build.log" 2>&1
  echo "    built in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- env file
write_env() {
  cat >"$STACK/env" <<EOF
# source .stack/env  -- written by scripts/stack.sh up
export KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export POSTGRES_DSN=$PG_DSN
export DATABASE_URL=$PG_DSN
export REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
export PRISM_PATH=$PRISM_BIN
EOF
}

# ---------------------------------------------------------------- subcommands
lock() {
  # One up/down at a time: a second caller waits instead of racing on ports/pids.
  # Daemons are started with 9>&- so they do not inherit (and hold) this lock.
  exec 9>"$STACK/.lock"
  flock -w 900 9 || fail "another stack.sh is still running (lock $STACK/.lock)"
}

cmd_up() {
  local t0=$SECONDS
  mkdir -p "$STACK" "$LOGS"
  lock
  python_deps
  pg_up
  redis_up
  kafka_up
  kafka_topics
  prism_build
  write_env
  STEP="done"
  echo
  echo "stack is up in $((SECONDS - t0))s:"
  echo "  KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT   (kafka $KAFKA_VERSION, KRaft)"
  echo "  POSTGRES_DSN=$PG_DSN"
  echo "  REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
  echo "  PRISM_PATH=$PRISM_BIN"
  echo "  (all of the above: source .stack/env)"
}

cmd_down() {
  mkdir -p "$STACK" "$LOGS"
  lock
  kafka_down
  redis_down
  pg_down
  STEP="done"
}

cmd_status() {
  local down=0 kv="" line
  [[ -s $KAFKA_LIBS/.complete ]] && kv=", kafka $(<"$KAFKA_LIBS/.complete")"
  if pid_running "$KAFKA_PID" kafka.Kafka && port_open "$KAFKA_PORT"; then
    line="up    127.0.0.1:$KAFKA_PORT (pid $(<"$KAFKA_PID")$kv)"
  else line="down  127.0.0.1:$KAFKA_PORT"; down=1; fi
  printf '%-9s %s\n' kafka "$line"

  pg_find_bin
  if [[ -n $PG_BIN ]] && pg_cluster_running && "$PG_BIN/pg_isready" -q -U postgres -h 127.0.0.1 -p "$PGPORT" -t 3; then
    line="up    127.0.0.1:$PGPORT ($PG_DSN)"
  else line="down  127.0.0.1:$PGPORT"; down=1; fi
  printf '%-9s %s\n' postgres "$line"

  if pid_running "$REDIS_PID" redis-server \
     && [[ $(redis_ping) == PONG ]]; then
    line="up    127.0.0.1:$REDIS_PORT (pid $(<"$REDIS_PID"))"
  else line="down  127.0.0.1:$REDIS_PORT"; down=1; fi
  printf '%-9s %s\n' redis "$line"

  if [[ -x $PRISM_BIN ]]; then
    line="up    $PRISM_BIN ($(prism_version "$PRISM_BIN"))"
  else line="down  $PRISM_BIN (missing; run: scripts/stack.sh up)"; down=1; fi
  printf '%-9s %s\n' prism "$line"
  return "$down"
}

# ---------------------------------------------------------------- one service of the stack
usage() {
  cat >&2 <<EOF
usage: $0 up|down|status
       $0 stop|start redis|postgres|kafka
       $0 instance up|down|purge|status redis|postgres|kafka PORT
EOF
  exit 2
}

# stop SERVICE: takes one service of the stack away, keeping its data (outage drills).
cmd_stop() {
  mkdir -p "$STACK" "$LOGS"
  lock
  case "$1" in
    redis) redis_stop_saving ;;
    postgres) pg_down ;;
    kafka) kafka_down ;;
    *) usage ;;
  esac
  STEP="done"
}

# start SERVICE: brings one service of the stack (back) up, as `up` would.
cmd_start() {
  mkdir -p "$STACK" "$LOGS"
  lock
  case "$1" in
    redis) redis_up ;;
    postgres) pg_up ;;
    kafka) python_deps; kafka_up; kafka_topics ;;
    *) usage ;;
  esac
  STEP="done"
}

# ---------------------------------------------------------------- extra instances
# Points the redis or postgres settings at the instance on PORT.
instance_use() {
  local svc=$1 port=$2 p
  if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1024 || port > 65535)); then
    echo "stack.sh: instance PORT must be a number from 1024 to 65535, not '$port'" >&2
    exit 2
  fi
  for p in $MAIN_PORTS; do
    if [[ $port == "$p" || ($svc == kafka && $((port + 1)) == "$p") ]]; then
      echo "stack.sh: port $p belongs to the stack itself; an instance needs another port" \
           "(a kafka instance also takes PORT+1)" >&2
      exit 2
    fi
  done
  case $svc in
    redis)
      REDIS_PORT=$port REDIS_DIR="$INSTANCES/redis-$port"
      REDIS_PID="$REDIS_DIR/redis.pid" REDIS_LOG="$REDIS_DIR/redis.log" ;;
    postgres)
      PGPORT=$port PG_DIR="$INSTANCES/postgres-$port"
      PG_DATA="$PG_DIR/data" PG_LOG="$PG_DIR/postgres.log" PG_SCHEMA_LOG="$PG_DIR/schema.log"
      PG_DSN="postgresql://analytics:analytics@127.0.0.1:$port/analytics" ;;
    kafka)
      KAFKA_PORT=$port KAFKA_CONTROLLER_PORT=$((port + 1)) KAFKA_DIR="$INSTANCES/kafka-$port"
      KAFKA_PID="$KAFKA_DIR/kafka.pid" KAFKA_PROPS="$KAFKA_DIR/server.properties"
      KAFKA_LOG="$KAFKA_DIR/kafka.log" KAFKA_FORMAT_LOG="$KAFKA_DIR/format.log"
      mkdir -p "$KAFKA_DIR" ;;
    *) usage ;;
  esac
}

cmd_instance() {
  local action=${1:-} svc=${2:-} port=${3:-}
  [[ -n $action && -n $svc && -n $port ]] || usage
  mkdir -p "$STACK" "$LOGS" "$INSTANCES"
  instance_use "$svc" "$port"
  # One verb per instance at a time; the stack's own lock is not taken, so an
  # instance never waits for a long `up`.
  exec 9>"$INSTANCES/$svc-$port.lock"
  flock -w 120 9 || fail "another stack.sh is still working on $svc instance $port"
  case "$action:$svc" in
    up:redis) redis_up ;;
    up:postgres) pg_up; echo "    dsn: $PG_DSN" ;;
    down:redis) redis_stop_saving ;;
    down:postgres) pg_down ;;
    purge:redis) redis_down; rm -rf "$REDIS_DIR"; echo "    removed $REDIS_DIR" ;;
    purge:postgres) pg_down; rm -rf "$PG_DIR"; echo "    removed $PG_DIR" ;;
    up:kafka) python_deps; kafka_up ;;
    down:kafka) kafka_down ;;
    purge:kafka) kafka_down; rm -rf "$KAFKA_DIR"; echo "    removed $KAFKA_DIR" ;;
    status:kafka)
      STEP="done"
      if pid_running "$KAFKA_PID" kafka.Kafka && port_open "$port"; then
        echo "kafka     up    127.0.0.1:$port (pid $(<"$KAFKA_PID"), $KAFKA_DIR)"
      else
        echo "kafka     down  127.0.0.1:$port"; exit 1
      fi ;;
    status:redis)
      STEP="done"
      if pid_running "$REDIS_PID" redis-server && [[ $(redis_ping) == PONG ]]; then
        echo "redis     up    127.0.0.1:$port (pid $(<"$REDIS_PID"), $REDIS_DIR)"
      else
        echo "redis     down  127.0.0.1:$port"; exit 1
      fi ;;
    status:postgres)
      STEP="done"
      pg_find_bin
      if [[ -n $PG_BIN ]] && pg_cluster_running && "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -t 3; then
        echo "postgres  up    127.0.0.1:$port ($PG_DSN, $PG_DIR)"
      else
        echo "postgres  down  127.0.0.1:$port"; exit 1
      fi ;;
    *) usage ;;
  esac
  [[ $action != purge ]] || rm -f "$INSTANCES/$svc-$port.lock"
  STEP="done"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status || exit 1 ;;  # non-zero when any component is down
  stop) [[ $# -eq 2 ]] || usage; cmd_stop "$2" ;;
  start) [[ $# -eq 2 ]] || usage; cmd_start "$2" ;;
  instance) [[ $# -eq 4 ]] || usage; cmd_instance "$2" "$3" "$4" ;;  # status: non-zero when down
  *) usage ;;
esac
