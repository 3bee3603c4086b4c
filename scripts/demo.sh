#!/usr/bin/env bash
# One transfer end to end on the services started by scripts/services.sh: migrates, starts one
# copy of each worker, opens two accounts, moves money, shows the balances, stops the workers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --quiet
T=target/release/twophase
: "${TWOPHASE_DATABASE_URL:=$(scripts/postgres.sh url)}"
: "${TWOPHASE_KAFKA__BROKERS:=$(scripts/kafka.sh bootstrap)}"
export TWOPHASE_DATABASE_URL TWOPHASE_KAFKA__BROKERS

$T migrate
$T topics create >/dev/null
logs="${TWOPHASE_SERVICES_DIR:-.services}"
mkdir -p "$logs"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT
for worker in coordinator account risk; do
  $T "$worker" 2>>"$logs/$worker.log" &
  pids+=($!)
done

a=$($T accounts open --currency USD)
b=$($T accounts open --currency USD)
$T accounts deposit "$a" 100.00 >/dev/null
$T transfer --from "$a" --to "$b" --amount 12.34 --currency USD --wait
$T transfer --from "$a" --to "$b" --amount 500.00 --currency USD --wait || true
$T accounts show "$a"
$T accounts show "$b"
