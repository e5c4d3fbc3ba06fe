#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, broker+controller in one JVM) for dev/tests/demo.
# Shipped in the package (streamproc/testing/data/kafka/; streamproc.testing.LocalBroker runs
# it), so `streamproc demo` and users' own tests start brokers from an install too; in a
# checkout, scripts/kafka.sh runs it.
#
#   bash scripts/kafka.sh start          # start (or reuse) a broker, print bootstrap address
#   bash $HERE/kafka.sh stop [--wipe]  # stop it; --wipe also deletes its data
#   bash scripts/kafka.sh clean          # same as: stop --wipe
#   bash scripts/kafka.sh status         # exit 0 + address if answering, else exit 1
#   bash scripts/kafka.sh jars           # fetch the jars (once), print their directory
#
# Environment:
#   KAFKA_BOOTSTRAP_SERVERS  if set and its first host:port answers, `start`/`status`
#                            just print it (no local broker is started)
#   KAFKA_PORT               PLAINTEXT port        (default 9092)
#   KAFKA_CONTROLLER_PORT    KRaft controller port (default 9093)
#   STREAMPROC_STATE_DIR     where .kafka/ (jars, data, logs) lives: default the checkout
#                            root when run from one, else ${XDG_CACHE_HOME:-~/.cache}/streamproc
#   KAFKA_DATA_DIR           data root (default .kafka/data; relative paths are taken
#                            from STREAMPROC_STATE_DIR). The broker lives in $KAFKA_DATA_DIR/<port>/
#   KAFKA_START_TIMEOUT      seconds to wait for readiness (default 90)
#   KAFKA_HEAP_OPTS          default "-Xms256m -Xmx768m"
#   KAFKA_JVM_OPTS           extra JVM options
#   KAFKA_EXTRA_PROPERTIES   extra server.properties lines (newline-separated), appended
#   KAFKA_EXTRA_LISTENERS    more listeners, space-separated PROTOCOL:PORT pairs (e.g.
#                            SASL_PLAINTEXT:9094), each named after its protocol; configure
#                            them with KAFKA_EXTRA_PROPERTIES (listener.name.<name>.*)
#   KAFKA_SCRAM_USERS        space-separated user:password pairs given SCRAM-SHA-256 and
#                            SCRAM-SHA-512 credentials when the storage is formatted
#   JAVA_HOME                used if set (Java 17+ required)
#
# The jars are fetched once with Maven (pom.xml beside this script) into .kafka/lib.
# The last stdout line of `start`/`status` is the bootstrap address; everything
# else goes to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$HERE/../../../.." && pwd)"
if [[ -n "${STREAMPROC_STATE_DIR:-}" ]]; then
  ROOT="$STREAMPROC_STATE_DIR"
elif [[ -f "$CHECKOUT/pyproject.toml" && -d "$CHECKOUT/streamproc" ]]; then
  ROOT="$CHECKOUT"
else
  ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/streamproc"
fi
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
KAFKA_HOME="$ROOT/.kafka"
LIB_DIR="$KAFKA_HOME/lib"
POM="$HERE/pom.xml"
LOG4J_CONF="$HERE/log4j2.xml"

HOST=127.0.0.1
PORT="${KAFKA_PORT:-9092}"
CPORT="${KAFKA_CONTROLLER_PORT:-9093}"
DATA_ROOT="${KAFKA_DATA_DIR:-.kafka/data}"
case "$DATA_ROOT" in /*) ;; *) DATA_ROOT="$ROOT/$DATA_ROOT" ;; esac
INST="$DATA_ROOT/$PORT"
PID_FILE="$INST/kafka.pid"
LOG_FILE="$INST/server.log"
OUT_FILE="$INST/kafka.out"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# can_connect HOST PORT -> 0 if a TCP connection succeeds within 2 s.
can_connect() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# First host:port of KAFKA_BOOTSTRAP_SERVERS (scheme stripped), or empty.
external_bootstrap() {
  local first="${KAFKA_BOOTSTRAP_SERVERS:-}"
  first="${first%%,*}"
  first="${first#*://}"
  first="${first// /}"
  printf '%s' "$first"
}

external_answers() {
  local hp host port
  hp="$(external_bootstrap)"
  [[ -n "$hp" && "$hp" == *:* ]] || return 1
  host="${hp%:*}"; port="${hp##*:}"
  host="${host#[}"; host="${host%]}"
  can_connect "$host" "$port"
}

# Pid of our broker if its pid file points at a live kafka.Kafka process.
running_pid() {
  local pid
  [[ -f "$PID_FILE" ]] || return 1
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  local cmdline
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$cmdline" == *kafka.Kafka* ]] || return 1
  printf '%s' "$pid"
}

check_java() {
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found (need Java 17+; set JAVA_HOME or install openjdk-17-jre-headless)"
  local ver major
  ver="$("$JAVA" -version 2>&1 | awk -F'"' '/version/ && !v {v = $2} END {print v}')"
  major="${ver%%.*}"
  [[ "$major" == 1 ]] && major="$(echo "$ver" | cut -d. -f2)"
  [[ "$major" =~ ^[0-9]+$ ]] || die "cannot parse Java version from '$JAVA -version' (got '$ver')"
  (( major >= 17 )) || die "Kafka 4.x needs Java 17+, found Java $ver ($JAVA); set JAVA_HOME"
}

fetch_jars() {
  local stamp want
  want="$(sha256sum "$POM" | cut -c1-16)"
  stamp="$LIB_DIR/.pom-$want"
  [[ -f "$stamp" ]] && return 0
  command -v mvn >/dev/null 2>&1 || die "mvn not found: needed once to fetch the Kafka jars (apt-get install maven)"
  mkdir -p "$KAFKA_HOME"
  local tmp="$KAFKA_HOME/lib.tmp.$$" mvn_log="$KAFKA_HOME/mvn.log"
  rm -rf "$tmp"
  log "fetching Kafka jars with Maven (once) -> $LIB_DIR"
  # Maven runs on a copy of the pom: the installed package may be read-only.
  cp "$POM" "$KAFKA_HOME/pom.xml"
  if ! mvn -B -q -f "$KAFKA_HOME/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mvn_log" 2>&1; then
    tail -n 40 "$mvn_log" >&2 || true
    rm -rf "$tmp"
    die "maven failed (full log: $mvn_log)"
  fi
  rm -rf "$LIB_DIR"
  mv "$tmp" "$LIB_DIR"
  touch "$LIB_DIR/.pom-$want"
}

write_config() {
  mkdir -p "$INST/logs"
  # Storage formatted for another controller port cannot be reused (the KRaft
  # voter endpoint is recorded at format time).
  if [[ -f "$INST/logs/meta.properties" && -f "$INST/controller.port" ]] \
     && [[ "$(cat "$INST/controller.port")" != "$CPORT" ]]; then
    die "$INST was formatted with controller port $(cat "$INST/controller.port"), not $CPORT; run: KAFKA_PORT=$PORT bash $HERE/kafka.sh stop --wipe"
  fi
  echo "$CPORT" >"$INST/controller.port"
  local listeners="PLAINTEXT://$HOST:$PORT" protocols="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
  local extra
  for extra in ${KAFKA_EXTRA_LISTENERS:-}; do
    listeners="$listeners,${extra%%:*}://$HOST:${extra##*:}"
    protocols="$protocols,${extra%%:*}:${extra%%:*}"
  done
  cat >"$INST/server.properties" <<EOF
# Generated by scripts/kafka.sh (rewritten on every start).
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CPORT
listeners=$listeners,CONTROLLER://$HOST:$CPORT
advertised.listeners=$listeners
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
log.dirs=$INST/logs

# Single node: every internal topic has RF 1 / min ISR 1 and one partition.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
default.replication.factor=1
min.insync.replicas=1

# Topics must be created explicitly (admin client) so typos show up as errors.
auto.create.topics.enable=false
num.partitions=1
group.initial.rebalance.delay.ms=0

# Small footprint for a 2-core dev box.
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
log.segment.bytes=16777216
log.retention.hours=24
log.retention.check.interval.ms=300000
EOF
  if [[ -n "${KAFKA_EXTRA_PROPERTIES:-}" ]]; then
    printf '%s\n' "$KAFKA_EXTRA_PROPERTIES" >>"$INST/server.properties"
  fi
}

format_storage() {
  [[ -f "$INST/logs/meta.properties" ]] && return 0
  local cp="$LIB_DIR/*" cluster_id user scram=()
  for user in ${KAFKA_SCRAM_USERS:-}; do
    scram+=(--add-scram "SCRAM-SHA-256=[name=${user%%:*},password=${user#*:}]"
            --add-scram "SCRAM-SHA-512=[name=${user%%:*},password=${user#*:}]")
  done
  local jopts=(-Xmx256m "-Dlog4j2.configurationFile=$LOG4J_CONF" "-Dkafka.logs.dir=$INST")
  cluster_id="$("$JAVA" "${jopts[@]}" -cp "$cp" kafka.tools.StorageTool random-uuid 2>>"$INST/format.log" | tail -n 1)"
  [[ -n "$cluster_id" ]] || { cat "$INST/format.log" >&2; die "StorageTool random-uuid failed"; }
  if ! "$JAVA" "${jopts[@]}" -cp "$cp" kafka.tools.StorageTool format --standalone \
        -t "$cluster_id" -c "$INST/server.properties" "${scram[@]}" >>"$INST/format.log" 2>&1; then
    tail -n 40 "$INST/format.log" >&2 || true
    die "StorageTool format failed (log: $INST/format.log)"
  fi
  log "formatted $INST/logs (cluster id $cluster_id)"
}

cmd_start() {
  if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
    if external_answers; then
      echo "$KAFKA_BOOTSTRAP_SERVERS"
      return 0
    fi
    log "KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS does not answer; starting a local broker on $HOST:$PORT"
  fi

  mkdir -p "$INST"
  # Serialise concurrent starts/stops of the same instance.
  exec 9>"$INST/.lock"
  flock -w 180 9 || die "timed out waiting for lock $INST/.lock"

  local pid
  if pid="$(running_pid)"; then
    if can_connect "$HOST" "$PORT"; then
      log "already running (pid $pid)"
      echo "$HOST:$PORT"
      return 0
    fi
    log "pid $pid is alive but $HOST:$PORT does not answer yet; waiting"
  else
    rm -f "$PID_FILE"
    if can_connect "$HOST" "$PORT"; then
      die "$HOST:$PORT is already in use by a process this script did not start; set KAFKA_BOOTSTRAP_SERVERS=$HOST:$PORT to use it, or pick another KAFKA_PORT"
    fi
    if can_connect "$HOST" "$CPORT"; then
      die "controller port $HOST:$CPORT is already in use; pick another KAFKA_CONTROLLER_PORT"
    fi

    check_java
    fetch_jars
    write_config
    format_storage

    rm -f "$LOG_FILE"
    # shellcheck disable=SC2086
    setsid nohup "$JAVA" $HEAP_OPTS ${KAFKA_JVM_OPTS:-} \
      -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
      -Djava.awt.headless=true \
      "-Dlog4j2.configurationFile=$LOG4J_CONF" "-Dkafka.logs.dir=$INST" \
      -cp "$LIB_DIR/*" kafka.Kafka "$INST/server.properties" \
      </dev/null >"$OUT_FILE" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"
    log "started broker pid $pid (log: $LOG_FILE)"
  fi

  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "broker exited during startup; last log lines:"
      tail -n 40 "$LOG_FILE" >&2 2>/dev/null || true
      tail -n 20 "$OUT_FILE" >&2 2>/dev/null || true
      rm -f "$PID_FILE"
      exit 1
    fi
    if grep -q 'Kafka Server started' "$LOG_FILE" 2>/dev/null && can_connect "$HOST" "$PORT"; then
      break
    fi
    if (( SECONDS >= deadline )); then
      log "broker not ready after ${START_TIMEOUT}s; last log lines:"
      tail -n 40 "$LOG_FILE" >&2 2>/dev/null || true
      tail -n 20 "$OUT_FILE" >&2 2>/dev/null || true
      log "(still running as pid $pid; stop it with: KAFKA_PORT=$PORT bash $HERE/kafka.sh stop)"
      exit 1
    fi
    sleep 0.5
  done
  log "ready on $HOST:$PORT"
  echo "$HOST:$PORT"
}

cmd_stop() {
  local wipe=0
  for a in "$@"; do
    case "$a" in
      --wipe) wipe=1 ;;
      *) die "unknown stop option: $a" ;;
    esac
  done
  if [[ -d "$INST" ]]; then
    exec 9>"$INST/.lock"
    flock -w 180 9 || die "timed out waiting for lock $INST/.lock"
  fi
  local pid
  if pid="$(running_pid)"; then
    log "stopping broker pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + ${KAFKA_STOP_TIMEOUT:-30}))
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not exit after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    fi
    log "stopped"
  else
    log "not running ($HOST:$PORT)"
  fi
  rm -f "$PID_FILE"
  if (( wipe )); then
    rm -rf "$INST"
    log "wiped $INST"
  fi
}

cmd_status() {
  local pid
  if pid="$(running_pid)" && can_connect "$HOST" "$PORT"; then
    log "running (pid $pid)"
    echo "$HOST:$PORT"
    return 0
  fi
  if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]] && external_answers; then
    echo "$KAFKA_BOOTSTRAP_SERVERS"
    return 0
  fi
  if can_connect "$HOST" "$PORT"; then
    log "$HOST:$PORT answers (not started by this script)"
    echo "$HOST:$PORT"
    return 0
  fi
  log "not running ($HOST:$PORT)"
  return 1
}

usage() {
  echo "usage: $0 start | stop [--wipe] | clean | status | jars" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
verb="$1"; shift
case "$verb" in
  start) [[ $# -eq 0 ]] || usage; cmd_start ;;
  stop) cmd_stop "$@" ;;
  clean) [[ $# -eq 0 ]] || usage; cmd_stop --wipe ;;
  status) [[ $# -eq 0 ]] || usage; cmd_status ;;
  jars) [[ $# -eq 0 ]] || usage; fetch_jars; echo "$LIB_DIR" ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
