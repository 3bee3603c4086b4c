#!/usr/bin/env bash
# Start/stop every service the tests need (PostgreSQL and Kafka) on loopback.
#
#   scripts/services.sh start   start both (installing/fetching on first use)
#   scripts/services.sh stop    stop both
#   scripts/services.sh env     print export lines for the tests, e.g.
#                               eval "$(scripts/services.sh env)"
#
# See scripts/postgres.sh and scripts/kafka.sh for the knobs (ports, state dir).
set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  echo "usage: $0 {start|stop|env}" >&2
  exit 2
}

cmd_start() {
  # In parallel: on a fresh machine PostgreSQL comes from apt and Kafka from
  # Maven, and the broker's JVM start dominates the warm path anyway.
  local pg_pid pg_rc=0 kafka_rc=0
  "$SCRIPTS/postgres.sh" start &
  pg_pid=$!
  "$SCRIPTS/kafka.sh" start || kafka_rc=$?
  wait "$pg_pid" || pg_rc=$?
  ((pg_rc == 0)) || echo "services.sh: PostgreSQL failed to start" >&2
  ((kafka_rc == 0)) || echo "services.sh: Kafka failed to start" >&2
  ((pg_rc == 0 && kafka_rc == 0))
}

cmd_stop() {
  # Stop both even if one fails, then report.
  local rc=0
  "$SCRIPTS/kafka.sh" stop || rc=1
  "$SCRIPTS/postgres.sh" stop || rc=1
  return "$rc"
}

cmd_env() {
  printf "export TWOPHASE_TEST_DATABASE_URL='%s'\n" "$("$SCRIPTS/postgres.sh" url)"
  printf "export TWOPHASE_TEST_BROKERS='%s'\n" "$("$SCRIPTS/kafka.sh" bootstrap)"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  *) usage ;;
esac
