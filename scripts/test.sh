#!/usr/bin/env bash
# Runs the test suite in the real ComfyUI host (CPU): installs it first if needed (scripts/setup_host.sh,
# idempotent), then `.venv/bin/python -m pytest` with the given arguments (default: the whole suite).
#
#   scripts/test.sh [--newest-frontend] [pytest arguments...]
#
# The browser tests use the host's own frontend (its comfyui-frontend-package). --newest-frontend (or
# CTRLORA_NEWEST_FRONTEND=1) runs them a second time against the newest frontend setup_host.sh unpacks into
# .frontends/ (served with ComfyUI's --front-end-root): the browser tests, or the same pytest arguments when given.
# Your own ComfyUI instead of the private host: COMFYUI_PATH=/path/to/ComfyUI PYTHON=/its/python (default python3;
# it needs pytest, requests and playwright besides ComfyUI's requirements; nothing is installed into it).
# Exits non-zero on any failure, including when pytest collects no tests at all (its exit code 5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

newest_frontend="${CTRLORA_NEWEST_FRONTEND:-0}"
if [ "${1:-}" = "--newest-frontend" ]; then
  newest_frontend=1
  shift
fi
# The tests that drive the page: the second pass of --newest-frontend runs these.
browser_tests=(tests/test_ui.py tests/test_first_run.py tests/test_workflows.py
               tests/test_crash.py::test_cancel_in_the_page_stops_within_a_step_keeps_the_run_and_shows_it)

if [ -n "${COMFYUI_PATH:-}" ]; then
  python="${PYTHON:-python3}"  # your own ComfyUI and its Python: nothing is installed into them
  if [ "$newest_frontend" = 1 ]; then bash scripts/setup_host.sh --frontend-only; fi
else
  python="$root/.venv/bin/python"
  if [ "$newest_frontend" = 1 ]; then bash scripts/setup_host.sh --newest-frontend; else bash scripts/setup_host.sh; fi
fi

run_pytest() {
  local status=0 started=$SECONDS
  "$python" -m pytest "$@" || status=$?
  echo "[ctrlora] pytest ${*:-(whole suite)}: exit code $status, $((SECONDS - started)) s"
  if [ "$status" -eq 5 ]; then
    echo "[ctrlora] pytest collected no tests (exit code 5): treating it as a failure." >&2
    status=1
  fi
  return "$status"
}

status=0
run_pytest "$@" || status=$?
if [ "$newest_frontend" = 1 ]; then
  frontend="$(realpath "$root/.frontends/newest")"
  echo "[ctrlora] browser tests again on the newest frontend: $frontend"
  if [ $# -gt 0 ]; then second=("$@"); else second=("${browser_tests[@]}"); fi
  CTRLORA_FRONTEND_ROOT="$frontend" run_pytest "${second[@]}" || status=$?
fi
exit "$status"
