"""Runs the pack inside the real ComfyUI host in this process, for tests, benchmarks and command-line tools.

Puts ComfyUI (``COMFYUI_PATH``, or the private host ``scripts/setup_host.sh`` installs in ``.comfyui/``) on
``sys.path``, selects CPU mode before ``comfy.model_management`` is imported, and imports the repository as a
package, as ComfyUI imports a folder of ``custom_nodes/``.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("COMFYUI_PATH", os.path.join(ROOT, ".comfyui"))
PACK = "comfyui_ctrlora"


def start(cpu=True):
    """The pack, imported once into the host (``cpu``: ComfyUI's --cpu)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    if not os.path.isfile(os.path.join(COMFYUI, "main.py")):
        raise RuntimeError(f"No ComfyUI at {COMFYUI}: run scripts/setup_host.sh or set COMFYUI_PATH.")
    sys.path.insert(0, COMFYUI)
    import comfy.cli_args
    if cpu:
        comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return pack
