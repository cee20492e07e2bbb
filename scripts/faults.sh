#!/usr/bin/env bash
# Runs Tether's fault suite: the tests/faults_*.rs binaries (CI runs them
# too, with few cycles, as part of scripts/test.sh). With --soak every fault
# repeats at its soak count instead (see the table in docs/operator-guide.md,
# "Fault suite"); that takes hours, not minutes. Network-namespace faults
# need root and skip, saying why, without it.
#
#   scripts/faults.sh           # CI cycle counts
#   scripts/faults.sh --soak    # soak cycle counts
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == --soak ]]; then
  export TETHER_FAULTS_SOAK=1
  shift
fi

tests=()
for f in tests/faults_*.rs; do
  tests+=(--test "$(basename "$f" .rs)")
done
# The hub's disk-full and link faults live beside its other process tests.
tests+=(--test hub_cli)

# One test at a time: several faults bind fixed ports inside their namespaces,
# and the starvation tests need the machine to themselves.
cargo test --release --locked "${tests[@]}" "$@" -- --test-threads=1 --nocapture
