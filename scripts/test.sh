#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (scripts/setup.sh), then runs every
# test of the workspace in release mode (model tests are unusably slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec cargo test --workspace --release "$@"
