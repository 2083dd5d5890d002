"""Runs the pack inside the real ComfyUI host (CPU): COMFYUI_PATH, or the host scripts/setup_host.sh installs."""
import importlib.util
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("COMFYUI_PATH", os.path.join(ROOT, ".comfyui"))
PACK = "comfyui_ctrlora"

if not os.path.isfile(os.path.join(COMFYUI, "main.py")):
    raise RuntimeError(f"No ComfyUI at {COMFYUI}: run scripts/setup_host.sh or set COMFYUI_PATH.")
sys.path.insert(0, COMFYUI)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management

import folder_paths  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def _load_pack():
    """Imports the repository as a package, as ComfyUI does with a folder in custom_nodes/."""
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


pack = _load_pack()


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
