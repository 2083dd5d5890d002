"""The models/ctrlora folder, also when extra_model_paths.yaml names it before the pack loads."""
import os

import folder_paths

from conftest import pack


def test_ctrlora_folder_is_registered_with_model_extensions(monkeypatch, tmp_path):
    # What ComfyUI does for a `ctrlora:` key in extra_model_paths.yaml, before custom nodes load.
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ctrlora", ([str(tmp_path)], set()))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    pack.nodes.model_folders.register()
    paths, extensions = folder_paths.folder_names_and_paths["ctrlora"]
    assert paths[0] == os.path.join(folder_paths.models_dir, "ctrlora") and str(tmp_path) in paths
    (tmp_path / "canny.ckpt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a model")
    assert pack.nodes.model_folders.list_files(["ctrlora"]) == ["canny.ckpt"]
