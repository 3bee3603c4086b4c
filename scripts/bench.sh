#!/usr/bin/env bash
# Reproduces the figures in BENCHMARKS.md: builds the release binary, starts a PostgreSQL and
# a Kafka of its own (fresh, on their own ports, removed afterwards, so that no earlier run's
# topics or tables weigh on this one), and for each set-up (one copy of each worker; two
# account workers) runs the closed loop at each concurrency in BENCH_CONCURRENCY (the best is
# the maximum sustained throughput), then the open loop at half that maximum, then at each rate
# in BENCH_RATES (none by default: the latency by rate), then one more closed loop at the
# highest concurrency with the ceiling reference (last, so that the ceiling's hundreds of MB
# through the broker and the database are not written out during an open loop); last of all,
# the embedded default's demo. Results go to target/bench/*.json.
#
#   scripts/bench.sh                 everything
#   BENCH_SECONDS=60 scripts/bench.sh
#   BENCH_CONCURRENCY="64 2048" scripts/bench.sh
#   BENCH_RATES="450 650" scripts/bench.sh   (also open loops at 450/s and 650/s)
#   BENCH_PARTITIONS=copies scripts/bench.sh (each topic gets as many partitions as the set-up
#                                             runs copies of a worker: 1, then 2; a number
#                                             sets it for both; by default the project's 4)
#   TWOPHASE_BIN=path/to/twophase scripts/bench.sh   (skip the build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${BENCH_SECONDS:-30}"
read -r -a concurrencies <<<"${BENCH_CONCURRENCY:-64 512 2048}"
read -r -a rates <<<"${BENCH_RATES:-}"
partitions="${BENCH_PARTITIONS:-}"
if [[ -n $partitions && $partitions != copies && ! $partitions =~ ^[1-9][0-9]*$ ]]; then
  echo "bench.sh: BENCH_PARTITIONS must be a number or 'copies', not '$partitions'" >&2
  exit 2
fi
out=target/bench
mkdir -p "$out"

if [[ -n "${TWOPHASE_BIN:-}" ]]; then
  T="$TWOPHASE_BIN"            # an already built binary
else
  cargo build --release --locked --quiet
  T="$PWD/target/release/twophase"
fi

# Services of the benchmark's own, beside any the tests use.
export TWOPHASE_SERVICES_DIR="$PWD/$out/services"
export TWOPHASE_PG_PORT="${BENCH_PG_PORT:-15442}"
export TWOPHASE_KAFKA_PORT="${BENCH_KAFKA_PORT:-19102}"
export TWOPHASE_KAFKA_CONTROLLER_PORT="${BENCH_KAFKA_CONTROLLER_PORT:-19103}"
# The broker as Kafka's own start script runs it: the optimising JIT (which the test scripts
# leave out, to start sooner) and a 1 GB heap from the start.
export TWOPHASE_KAFKA_JAVA_OPTS="-XX:TieredStopAtLevel=4 -Xms1G ${TWOPHASE_KAFKA_JAVA_OPTS:-}"
scripts/services.sh stop >/dev/null 2>&1 || true
rm -rf "$TWOPHASE_SERVICES_DIR"
scripts/services.sh start >/dev/null
admin_url="$(scripts/postgres.sh url)"
brokers="$(scripts/kafka.sh bootstrap)"

pids=()
stop_workers() {
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  pids=()
}
stop_all() {
  stop_workers
  scripts/services.sh stop >/dev/null 2>&1 || true
  rm -rf "$TWOPHASE_SERVICES_DIR"
}
trap stop_all EXIT

# One set-up: a fresh database and topic prefix, the workers, the closed then the open loop.
run_setup() {
  local name=$1 account_workers=$2
  local id
  id="bench_${name//-/_}_$(date +%s)"
  psql -q "$admin_url" -c "CREATE DATABASE $id"
  export TWOPHASE_DATABASE_URL="${admin_url%/*}/$id"
  export TWOPHASE_KAFKA__BROKERS="$brokers"
  export TWOPHASE_KAFKA__TOPIC_PREFIX="$id."
  export TWOPHASE_KAFKA__GROUP_PREFIX="$id"
  case "$partitions" in
    "") ;;
    copies) export TWOPHASE_KAFKA__PARTITIONS="$account_workers" ;;
    *) export TWOPHASE_KAFKA__PARTITIONS="$partitions" ;;
  esac
  # The workload sends from each of its 100 accounts far faster, and more in a day, than the
  # risk rules allow a person: up to 1,000 a second from one account, and no daily limit to
  # speak of. The velocity window is a second so that, as with the default rule (30 a
  # minute), the count stops after a few dozen rows: counted over a minute at this workload's
  # pace, it would read hundreds of rows per account that no real account has.
  cat >"$out/$id.toml" <<TOML
[risk]
velocity_max_transfers = 1000
velocity_window = "1s"
[risk.daily_limit]
USD = "1000000000"
TOML
  export TWOPHASE_CONFIG="$out/$id.toml"
  export TWOPHASE_METRICS_LISTEN=127.0.0.1:0
  "$T" migrate >/dev/null
  "$T" topics create >/dev/null
  local workers=(coordinator risk)
  for ((i = 0; i < account_workers; i++)); do workers+=(account); done
  for w in "${workers[@]}"; do
    "$T" "$w" 2>>"$out/$id-$w.log" &
    pids+=($!)
  done
  local best=0 c
  for c in "${concurrencies[@]}"; do
    echo "== $name: closed loop, concurrency $c, ${seconds}s"
    "$T" bench --concurrency "$c" --duration "${seconds}s" --json "$out/$name-closed-$c.json"
    best=$(python3 -c "import json,sys; print(max(float(sys.argv[1]), json.load(open(sys.argv[2]))['completed_per_second']))" "$best" "$out/$name-closed-$c.json")
  done
  local rate
  rate=$(python3 -c "import sys; print(round(float(sys.argv[1]) / 2, 1))" "$best")
  echo "== $name: open loop at half the maximum ($best completed/s), ${rate}/s, ${seconds}s"
  "$T" bench --rate "$rate" --duration "${seconds}s" --json "$out/$name-open.json"
  local fixed
  for fixed in "${rates[@]}"; do
    echo "== $name: open loop at ${fixed}/s, ${seconds}s"
    "$T" bench --rate "$fixed" --duration "${seconds}s" --json "$out/$name-open-$fixed.json"
  done
  c="${concurrencies[-1]}"
  echo "== $name: closed loop, concurrency $c, ${seconds}s, and the ceiling reference"
  "$T" bench --concurrency "$c" --duration "${seconds}s" --ceiling --json "$out/$name-ceiling.json"
  stop_workers
}

run_setup one-copy-each 1
run_setup two-account-workers 2

echo "== embedded default: twophase dev --demo 5000"
# The embedded default as a newcomer gets it: none of the set-ups' settings.
env -u TWOPHASE_DATABASE_URL -u TWOPHASE_KAFKA__BROKERS -u TWOPHASE_KAFKA__TOPIC_PREFIX \
  -u TWOPHASE_KAFKA__GROUP_PREFIX -u TWOPHASE_KAFKA__PARTITIONS -u TWOPHASE_CONFIG \
  -u TWOPHASE_METRICS_LISTEN \
  "$T" dev --data-dir "$(mktemp -d)" --demo 5000 --json >"$out/embedded.json"
python3 -c "import json; s=json.load(open('$out/embedded.json')); print({k: s[k] for k in ('terminal', 'transfers_per_second', 'latency_p50_ms', 'latency_p99_ms')})"
