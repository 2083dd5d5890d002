"""Where CtrLoRA files live: ``models/ctrlora/`` (registered here), plus ``models/controlnet/`` for bases."""
import os

import folder_paths

FOLDER = "ctrlora"
BASE_FOLDERS = (FOLDER, "controlnet")


def register():
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    extensions = folder_paths.folder_names_and_paths[FOLDER][1]
    # An extra_model_paths.yaml entry may have created the folder first, with no extension filter.
    if not extensions:
        extensions.update(folder_paths.supported_pt_extensions)


def list_files(folders):
    names = []
    for folder in folders:
        names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return sorted(names)


def resolve(name, folders, node):
    """Full path of ``name`` in the first of ``folders`` that has it; names cannot leave their folder."""
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    where = " or ".join(f"models/{f}/" for f in folders)
    raise FileNotFoundError(f"{node}: '{name}' is not in {where}; put the file there and refresh.")
