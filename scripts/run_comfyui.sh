#!/usr/bin/env bash
# Starts ComfyUI with this pack.
#
#   scripts/run_comfyui.sh [COMFYUI_PATH] [extra ComfyUI args...]
#
# No COMFYUI_PATH (or a first argument starting with "-"): installs the local host if needed
# (scripts/setup_host.sh --no-system-packages, idempotent: Python packages into .venv/ only, never system
# packages) and starts .comfyui/ with .venv/bin/python.
# COMFYUI_PATH: an existing ComfyUI folder, started with $PYTHON (default: python, else python3).
# Either way the pack is linked into that ComfyUI's custom_nodes/ (as ComfyUI-CtrLoRA) unless it is
# already there, and --cpu is added when that Python sees no GPU (CUDA, MPS or XPU).
# Listens on 127.0.0.1, port $PORT (default 8188). Model files go in <ComfyUI>/models/ctrlora/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${PORT:-8188}"
link_name="ComfyUI-CtrLoRA"

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  comfyui="$(cd "$1" 2>/dev/null && pwd)" || { echo "[ctrlora] no such folder: $1" >&2; exit 2; }
  shift
  if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
  elif command -v python >/dev/null 2>&1; then
    python=python
  else
    python=python3
  fi
else
  bash "$root/scripts/setup_host.sh" --no-system-packages
  comfyui="$root/.comfyui"
  python="$root/.venv/bin/python"
fi

if [ ! -f "$comfyui/main.py" ]; then
  echo "[ctrlora] $comfyui is not a ComfyUI folder (it has no main.py)." >&2
  exit 2
fi

# Make the pack visible: nothing to do when some entry of custom_nodes/ already is this repository.
custom_nodes="$comfyui/custom_nodes"
mkdir -p "$custom_nodes"
real_root="$(realpath "$root")"
present=""
for entry in "$custom_nodes"/*; do
  if [ -d "$entry" ] && [ "$(realpath "$entry")" = "$real_root" ]; then
    present="$entry"
    break
  fi
done
if [ -z "$present" ]; then
  if [ -e "$custom_nodes/$link_name" ] || [ -L "$custom_nodes/$link_name" ]; then
    echo "[ctrlora] $custom_nodes/$link_name exists and is not this repository ($root);" \
         "move it away or start that ComfyUI directly." >&2
    exit 2
  fi
  ln -s "$real_root" "$custom_nodes/$link_name"
  echo "[ctrlora] linked $custom_nodes/$link_name -> $real_root"
else
  echo "[ctrlora] pack already in custom_nodes: $present"
fi

args=(--listen 127.0.0.1 --port "$port")
wants_device=1
for arg in "$@"; do
  case "$arg" in --cpu|--directml*) wants_device=0 ;; esac
done
if [ "$wants_device" = 1 ]; then
  has_gpu="$("$python" -c '
import torch
mps = getattr(torch.backends, "mps", None)
xpu = getattr(torch, "xpu", None)
print(int(torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())))
')" || { echo "[ctrlora] $python cannot import torch; install ComfyUI's requirements first." >&2; exit 2; }
  if [ "$has_gpu" != 1 ]; then
    echo "[ctrlora] no GPU visible to torch: adding --cpu"
    args+=(--cpu)
  fi
fi

echo "[ctrlora] ComfyUI: $comfyui"
echo "[ctrlora] Python:  $python"
echo "[ctrlora] Models:  put CtrLoRA files in $comfyui/models/ctrlora/"
echo
echo "    ComfyUI with CtrLoRA will be at: http://127.0.0.1:$port"
echo
cd "$comfyui"
exec "$python" main.py "${args[@]}" "$@"
