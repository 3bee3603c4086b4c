#!/usr/bin/env bash
# Run the whole test suite against real services: starts PostgreSQL and Kafka on loopback
# (installing them on first use), then runs every test with them in the environment.
#
#   scripts/test.sh                 all tests
#   scripts/test.sh --test saga     any cargo test arguments
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

scripts/services.sh start
eval "$(scripts/services.sh env)"
# Without both, the tests would fall back to the embedded default and prove nothing about
# the real services.
: "${TWOPHASE_TEST_DATABASE_URL:?scripts/services.sh env gave no database URL}"
: "${TWOPHASE_TEST_BROKERS:?scripts/services.sh env gave no Kafka bootstrap servers}"
if [[ $# -eq 0 ]]; then
  # --show-output prints what passing tests print too (the figures they measure).
  set -- -- --show-output
fi
cargo test --workspace --locked "$@"
