#!/usr/bin/env bash
# Run a real single-node Apache Kafka broker (KRaft, broker+controller in one
# JVM) on loopback for the tests.
#
#   scripts/kafka.sh start      fetch the jars if needed, format storage once,
#                               start the broker, wait until it answers
#   scripts/kafka.sh stop       SIGTERM, then SIGKILL after a bounded wait
#   scripts/kafka.sh status     exit 0 when running
#   scripts/kafka.sh bootstrap  print the bootstrap address
#
# Environment:
#   TWOPHASE_SERVICES_DIR            state dir (default: <repo>/.services)
#   TWOPHASE_KAFKA_PORT              client port (default: 19092)
#   TWOPHASE_KAFKA_CONTROLLER_PORT   KRaft controller port (default: 19093)
#   TWOPHASE_KAFKA_VERSION           Kafka release from Maven Central (default below)
#   TWOPHASE_KAFKA_START_TIMEOUT     seconds to wait for readiness (default: 90)
#   TWOPHASE_KAFKA_STOP_TIMEOUT      seconds before SIGKILL (default: 30)
#   TWOPHASE_KAFKA_JAVA_OPTS         extra JVM options for the broker
#
# Only Maven Central is reachable (no apache.org downloads), so the broker is
# assembled from the kafka_2.13 artifact and its runtime dependencies, listed
# in scripts/kafka/pom.xml, and run with plain `java -cp`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# 4.3.1: newest release whose broker *and* tools are fully served by our Maven
# Central. Kafka 4.x dropped very old protocol versions (KIP-896; rdkafka is
# fine); TWOPHASE_KAFKA_VERSION=3.9.1 also starts if ever needed.
KAFKA_VERSION="${TWOPHASE_KAFKA_VERSION:-4.3.1}"
PORT="${TWOPHASE_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${TWOPHASE_KAFKA_CONTROLLER_PORT:-19093}"
START_TIMEOUT="${TWOPHASE_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${TWOPHASE_KAFKA_STOP_TIMEOUT:-30}"
BOOTSTRAP="127.0.0.1:$PORT"

POM="$REPO/scripts/kafka/pom.xml"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/twophase/kafka-$KAFKA_VERSION"
LIBS="$CACHE_DIR/libs"
MARKER="$CACHE_DIR/complete"

STATE_DIR="${TWOPHASE_SERVICES_DIR:-$REPO/.services}"

set_paths() {
  KAFKA_DIR="$STATE_DIR/kafka"
  DATA_DIR="$KAFKA_DIR/data"
  PROPS="$KAFKA_DIR/server.properties"
  LOG="$KAFKA_DIR/server.log"
  PID_FILE="$KAFKA_DIR/kafka.pid"
}
set_paths
# Normalise an existing (possibly relative) state dir: the pid lookup matches
# the absolute server.properties path in the process command line.
if [[ -d $STATE_DIR ]]; then
  STATE_DIR="$(cd "$STATE_DIR" && pwd)"
  set_paths
fi

die() {
  echo "kafka.sh: $*" >&2
  exit 1
}

usage() {
  echo "usage: $0 {start|stop|status|bootstrap}" >&2
  exit 2
}

# A fresh Debian machine may lack Java or Maven; both come from Debian.
ensure_tools() {
  local missing=()
  command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
  ((${#missing[@]} == 0)) && return 0
  [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}"
  echo "kafka.sh: installing ${missing[*]} from Debian packages" >&2
  # services.sh starts both scripts in parallel: serialise our apt runs,
  # and let apt wait for any other holder of the dpkg lock.
  mkdir -p /run/lock
  (
    flock -w 900 7 || exit 1
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}"
  ) 7>/run/lock/twophase-apt.lock
}

# The marker records the pom's hash, so editing the pom (or the version)
# refetches instead of silently reusing an incomplete or stale set of jars.
fetch_fingerprint() {
  { echo "$KAFKA_VERSION"; cat "$POM"; } | sha256sum | cut -d' ' -f1
}

fetch_libs() {
  local want
  want="$(fetch_fingerprint)"
  [[ -f $MARKER && $(cat "$MARKER") == "$want" ]] && return 0
  mkdir -p "$CACHE_DIR"
  # Another checkout may be fetching into the same cache right now.
  exec 8>"$CACHE_DIR/fetch.lock"
  flock -w 600 8 || die "timed out waiting for $CACHE_DIR/fetch.lock"
  if [[ ! -f $MARKER || $(cat "$MARKER") != "$want" ]]; then
    echo "kafka.sh: fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS" >&2
    rm -rf "$LIBS" "$LIBS.tmp" "$MARKER"
    # Output goes to a log: Debian's mvn prints colour codes even with -B,
    # and only failures are interesting.
    if ! (mvn -B -f "$POM" \
      -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$LIBS.tmp") >"$CACHE_DIR/fetch.log" 2>&1; then
      tail -n 40 "$CACHE_DIR/fetch.log" >&2
      die "fetching Kafka $KAFKA_VERSION with Maven failed (full log: $CACHE_DIR/fetch.log)"
    fi
    [[ -f $LIBS.tmp/kafka_2.13-$KAFKA_VERSION.jar ]] ||
      die "Maven did not deliver kafka_2.13-$KAFKA_VERSION.jar"
    mv "$LIBS.tmp" "$LIBS"
    echo "$want" >"$MARKER"
  fi
  exec 8>&-
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The broker's pid, or nothing. The pid file is trusted only if that process
# really is our broker (pids get reused); otherwise fall back to scanning
# /proc for a kafka.Kafka started with our server.properties, in case the
# pid file was lost.
find_pid() {
  local pid cmdline cmdfile
  if [[ -f $PID_FILE ]]; then
    pid="$(cat "$PID_FILE")"
    if [[ $pid =~ ^[0-9]+$ ]] && cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" &&
      [[ $cmdline == *kafka.Kafka*"$PROPS"* ]]; then
      echo "$pid"
      return 0
    fi
  fi
  for cmdfile in /proc/[0-9]*/cmdline; do
    cmdline="$(tr '\0' ' ' 2>/dev/null <"$cmdfile")" || continue
    if [[ $cmdline == *kafka.Kafka*"$PROPS"* ]]; then
      pid="${cmdfile#/proc/}"
      echo "${pid%/cmdline}"
      return 0
    fi
  done
  return 0
}

# Rewritten on every start, so port changes apply to an existing data dir.
write_configs() {
  cat >"$PROPS" <<EOF
# Generated by scripts/kafka.sh on each start; edits are overwritten.
process.roles=broker,controller
node.id=1
# Static quorum (not --standalone/dynamic): the controller address lives only
# in this file, so it can change without reformatting the storage.
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR

# Single node: every internal topic has exactly one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions than the defaults (50) so the first consumer
# group / transaction on a fresh broker is ready sooner.
offsets.topic.num.partitions=8
transaction.state.log.num.partitions=8

# Tests: no 3 s wait before the first rebalance; topics appear on first use.
group.initial.rebalance.delay.ms=0
num.partitions=4
auto.create.topics.enable=true
EOF

  # Broker logging: everything to stdout, which start() appends to server.log
  # together with anything the JVM itself prints.
  cat >"$KAFKA_DIR/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF

  # CLI tools (StorageTool, manual checks): warnings only, to stderr.
  cat >"$KAFKA_DIR/tools-log4j2.properties" <<'EOF'
status = warn
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = ERR
EOF
}

# Run a Kafka CLI class from the same jars, quietly.
kafka_tool() {
  java -Xmx256m -Dlog4j2.configurationFile="$KAFKA_DIR/tools-log4j2.properties" \
    -cp "$LIBS/*" "$@"
}

# KRaft cluster ids are 16 random bytes, base64url without padding (what
# StorageTool random-uuid prints); made here to save a JVM start. Kafka avoids
# ids starting with '-' since they look like CLI flags, so do we.
random_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
    [[ $id != -* ]] && break
  done
  echo "$id"
}

format_storage() {
  [[ -f $DATA_DIR/meta.properties ]] && return 0
  echo "kafka.sh: formatting KRaft storage in $DATA_DIR" >&2
  kafka_tool kafka.tools.StorageTool format --ignore-formatted \
    --cluster-id "$(random_cluster_id)" --config "$PROPS" >/dev/null ||
    die "kafka.tools.StorageTool format failed"
}

# True when the broker answers a real Kafka request. The listener port
# accepts TCP connections early in startup, but requests are only processed
# once the broker has caught up with the metadata log and been unfenced, so a
# reply proves it is ready for clients. Pure bash (/dev/tcp), because a JVM
# per probe (TopicCommand --list) costs seconds on every restart.
# Request: ApiVersions v0 (api_key 18), correlation id 0x74700001, null
# client id; still served by every broker version. The reply must echo the
# correlation id with error_code 0.
kafka_answers() {
  local reply
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash, on purpose
  reply="$(timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "\x00\x00\x00\x0a\x00\x12\x00\x00\x74\x70\x00\x01\xff\xff" >&3
    head -c 10 <&3 | od -An -tx1 | tr -d " \n"
  ' _ "$PORT" 2>/dev/null)" || return 1
  [[ $reply =~ ^[0-9a-f]{8}747000010000$ ]]
}

wait_ready() {
  local pid="$1" deadline=$((SECONDS + START_TIMEOUT))
  until kafka_answers; do
    # Re-find the broker if $pid is gone, in case setsid did fork after all.
    if ! kill -0 "$pid" 2>/dev/null && pid="$(find_pid)" && [[ -z $pid ]]; then
      echo "kafka.sh: the broker exited during startup; last log lines ($LOG):" >&2
      tail -n 60 "$LOG" >&2 || true
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      echo "kafka.sh: the broker did not become ready on $BOOTSTRAP within ${START_TIMEOUT}s; last log lines ($LOG):" >&2
      tail -n 60 "$LOG" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

# Serialise concurrent start/stop calls (e.g. parallel outage tests).
take_lock() {
  exec 9>"$STATE_DIR/kafka.lock"
  flock -w 180 9 || die "timed out waiting for $STATE_DIR/kafka.lock"
}

cmd_start() {
  ensure_tools
  fetch_libs
  mkdir -p "$STATE_DIR"
  STATE_DIR="$(cd "$STATE_DIR" && pwd)"
  set_paths
  mkdir -p "$KAFKA_DIR" "$DATA_DIR"
  take_lock

  local pid
  pid="$(find_pid)"
  if [[ -n $pid ]]; then
    wait_ready "$pid"
    return 0
  fi
  port_open "$PORT" && die "127.0.0.1:$PORT is already in use by another process"
  port_open "$CONTROLLER_PORT" && die "127.0.0.1:$CONTROLLER_PORT is already in use by another process"

  write_configs
  format_storage
  # Keep the log from growing without bound across many restarts.
  if [[ -f $LOG ]] && (($(stat -c %s "$LOG") > 64 * 1024 * 1024)); then
    mv -f "$LOG" "$LOG.1"
  fi
  echo "==== kafka.sh start $(date -Is) (Kafka $KAFKA_VERSION) ====" >>"$LOG"
  # TieredStopAtLevel=1 (C1 JIT only): the broker starts ~3 s sooner on a
  # busy 2-CPU machine, which matters because tests restart it; test traffic
  # is far too light to miss C2. TWOPHASE_KAFKA_JAVA_OPTS comes last, so it
  # can override any of these.
  local extra_opts=()
  read -r -a extra_opts <<<"${TWOPHASE_KAFKA_JAVA_OPTS:-}"
  # setsid: own session, so the broker outlives the caller's terminal or CI
  # step and does not get its signals. setsid execs in place here (a
  # background job of a non-interactive shell is no group leader), so $! is
  # java's pid. stdin/stdout/stderr and the lock fd are detached so no
  # caller's pipe is held open by the broker.
  setsid java -Xms256m -Xmx1G -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:TieredStopAtLevel=1 -Djava.awt.headless=true "${extra_opts[@]}" \
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$PROPS" \
    </dev/null >>"$LOG" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"
  wait_ready "$pid"
}

cmd_stop() {
  [[ -d $STATE_DIR ]] || return 0
  take_lock
  local pid deadline
  pid="$(find_pid)"
  if [[ -n $pid ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "kafka.sh: broker did not stop within ${STOP_TIMEOUT}s, killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
  fi
  rm -f "$PID_FILE"
  # The port can linger briefly after exit; callers expect it closed.
  deadline=$((SECONDS + 10))
  while port_open "$PORT" && ((SECONDS < deadline)); do
    sleep 0.1
  done
  ! port_open "$PORT" || die "127.0.0.1:$PORT is still open after stopping the broker"
}

cmd_status() {
  [[ -n $(find_pid) ]]
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  bootstrap) echo "$BOOTSTRAP" ;;
  *) usage ;;
esac
