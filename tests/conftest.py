"""Runs the pack inside the real ComfyUI host (CPU): COMFYUI_PATH, or the host scripts/setup_host.sh installs."""
import os
import shutil
import sys

import pytest

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made tiny steps 10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_host  # noqa: E402

ROOT, COMFYUI, PACK = comfy_host.ROOT, comfy_host.COMFYUI, comfy_host.PACK
pack = comfy_host.start(cpu=True)

import folder_paths  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """A fresh models folder with ``ctrlora/`` and ``controlnet/`` registered as ComfyUI's model folders."""
    for folder in ("ctrlora", "controlnet"):
        (tmp_path / folder).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder,
                            ([str(tmp_path / folder)], set(folder_paths.supported_pt_extensions)))
    # ComfyUI caches folder listings; a fresh folder must be listed afresh.
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return tmp_path


@pytest.fixture
def golden_files(models_dir):
    """The official golden base and LoRA in models/ctrlora/."""
    from tiny import GOLDEN
    for name in ("base.ckpt", "lora0.ckpt"):
        shutil.copy(os.path.join(GOLDEN, name), models_dir / "ctrlora" / name)
    return models_dir / "ctrlora"
