"""Which folders a prompt may name: ComfyUI's input folder, and the roots the server's owner allows.

Whoever can reach the server (``--listen``) can queue a prompt, so a dataset folder named in one must resolve,
links followed, inside

* ComfyUI's input folder (``ComfyUI/input/``, or ``--input-directory``): relative names start there;
* a folder listed in the environment variable ``CTRLORA_ALLOWED_ROOTS`` (separated by ``os.pathsep``: ``:`` on
  Linux and macOS, ``;`` on Windows), or under ``ctrlora_datasets:`` in ComfyUI's ``extra_model_paths.yaml``.

Anything else is refused before it is looked at: the message repeats what was typed, never whether it exists
or where a link leads. Inside a dataset, files and links must stay inside the dataset folder (``dataset.py``).
Image names (Load Condition Image) follow the same rule, from the folder their annotation names (input by default).
"""
import os

from ..ctrlora_core import CtrLoRAError

ALLOWED_ROOTS_ENV = "CTRLORA_ALLOWED_ROOTS"
DATASETS_FOLDER = "ctrlora_datasets"  # the extra_model_paths.yaml key


def inside(root, path):
    """Whether the real path ``path`` is the real path ``root`` or below it."""
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # another drive (Windows), or relative and absolute mixed
        return False


def allowed_roots():
    """The real paths of the folders a prompt may name, the input folder first."""
    import folder_paths

    roots = [folder_paths.get_input_directory()]
    roots += folder_paths.folder_names_and_paths.get(DATASETS_FOLDER, ([], set()))[0]
    roots += os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep)
    return [os.path.realpath(os.path.expanduser(r.strip())) for r in roots if r.strip()]


def dataset_folder(folder, label="Train CtrLoRA"):
    """The real path of the dataset folder a prompt names (relative names from ComfyUI's input folder).

    Raises ``CtrLoRAError`` when it is empty or resolves outside the allowed roots."""
    import folder_paths

    typed = (folder or "").strip()
    if not typed:
        raise CtrLoRAError(f"{label}: no dataset folder given.")
    try:  # join() keeps an absolute path as it is; realpath() follows every link, so a link cannot lead out
        path = os.path.realpath(os.path.join(folder_paths.get_input_directory(), os.path.expanduser(typed)))
    except ValueError:  # a NUL character
        path = None
    if path is None or not any(inside(root, path) for root in allowed_roots()):
        raise CtrLoRAError(
            f"{label}: the dataset folder {typed!r} is outside ComfyUI's input folder and the folders this server "
            f"allows (a link that leads outside counts as outside). Put the dataset in ComfyUI/input/ and give its "
            f"name (e.g. 'my_pairs'), or ask the server's owner to add its folder to {ALLOWED_ROOTS_ENV}.")
    return path


def input_file(name, label):
    """The real path of a file a prompt names as Load Image does (``x.png``, ``sub/x.png``, ``x.png [output]``).

    Raises ``CtrLoRAError`` when it resolves outside that folder and the allowed roots."""
    import folder_paths

    bare, base = folder_paths.annotated_filepath(str(name or ""))
    base = base or folder_paths.get_input_directory()
    try:
        path = os.path.realpath(os.path.join(base, bare))
    except ValueError:  # a NUL character
        path = None
    if path is None or not any(inside(root, path) for root in [os.path.realpath(base)] + allowed_roots()):
        raise CtrLoRAError(f"{label}: the image {name!r} is outside ComfyUI's input folder; pick or upload an image "
                           "there.")
    return path
