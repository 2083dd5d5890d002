#!/usr/bin/env bash
# Runs the test suite in the real ComfyUI host (CPU): installs it first if needed (scripts/setup_host.sh,
# idempotent), then `.venv/bin/python -m pytest` with the given arguments (default: the whole suite).
# Exits non-zero on any failure, including when pytest collects no tests at all (its exit code 5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup_host.sh

status=0
"$root/.venv/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "[ctrlora] pytest collected no tests (exit code 5): treating it as a failure." >&2
  exit 1
fi
exit "$status"
