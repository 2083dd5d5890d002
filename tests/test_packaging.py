"""Install hygiene: what the Comfy Registry gets, and what installing or starting the pack may change.

The package is built as ``comfy node pack`` (comfy-cli) builds it: the git-tracked files, minus what
``.comfyignore`` matches (git's wildmatch rules), plus every file under ``[tool.comfy] includes``. The metadata is
read with ComfyUI's own pyproject parser (``comfy_config``).
"""
import ast
import os
import re
import subprocess
import zipfile

import pytest

from conftest import COMFYUI, ROOT

PACK_CODE = ("__init__.py", "ctrlora_core/", "nodes/", "training/", "web/", "workflows/")
NEVER_SHIPPED = ("tests/", "bench/", ".ci/", ".venv/", ".comfyui/", "tests/artifacts/", "bench/results/")
SYSTEM_PACKAGE_MANAGERS = ("apt-get", "apt ", "sudo", "dnf", "yum", "brew", "pacman", "zypper", "apk ", "snap ")
VERSION = re.compile(r"^\d+\.\d+\.\d+$")
# The registry's node id rules: < 100 characters of letters, digits, - _ .; no two special characters in a row;
# starts with a letter.
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")


def git(*args):
    return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True, text=True).stdout.split("\n")


@pytest.fixture(scope="module")
def config():
    import sys
    sys.path.insert(0, COMFYUI)
    from comfy_config import config_parser
    return config_parser.extract_node_configuration(ROOT)


@pytest.fixture(scope="module")
def package(config, tmp_path_factory):
    """The archive `comfy node pack` would upload, built here by its rules; its member names."""
    tracked = {f for f in git("ls-files") if f}
    ignored = {f for f in git("ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore") if f}
    includes = [os.path.normpath(i.strip("/")) for i in config.tool_comfy.includes]
    forced = lambda name: any(name == i or name.startswith(i + "/") for i in includes)  # noqa: E731
    names = {f for f in tracked if f not in ignored or forced(f)}
    for include in includes:
        for folder, _, files in os.walk(os.path.join(ROOT, include)):
            names |= {os.path.relpath(os.path.join(folder, f), ROOT) for f in files}
    names = {n for n in names if os.path.isfile(os.path.join(ROOT, n))}  # tracked but deleted in this checkout
    archive = tmp_path_factory.mktemp("pack") / "node.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(names):
            z.write(os.path.join(ROOT, name), name)
    with zipfile.ZipFile(archive) as z:
        return sorted(z.namelist())


def test_registry_metadata(config):
    project, comfy = config.project, config.tool_comfy
    assert NODE_ID.match(project.name) and len(project.name) < 100 and "comfyui" not in project.name.lower()
    assert VERSION.match(project.version), project.version
    assert project.description and project.requires_python
    assert project.license.file and os.path.isfile(os.path.join(ROOT, project.license.file))
    assert project.urls.repository.startswith("https://github.com/")
    assert comfy.publisher_id and comfy.display_name == "CtrLoRA"
    assert comfy.includes and all(os.path.isdir(os.path.join(ROOT, i)) for i in comfy.includes)
    assert "OS Independent" in project.supported_os


def test_the_icon_is_a_shipped_file_of_registry_size(config, package):
    prefix = config.project.urls.repository.replace("https://github.com/", "https://raw.githubusercontent.com/")
    icon = config.tool_comfy.icon
    assert icon.startswith(prefix + "/main/"), icon
    path = icon[len(prefix + "/main/"):]
    assert path in package and path.endswith((".svg", ".png", ".jpg", ".gif"))
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        svg = f.read()
    width, height = (int(re.search(rf'{k}="(\d+)"', svg).group(1)) for k in ("width", "height"))
    assert width <= 400 and height <= 400  # the registry's limit


def test_dependencies_never_include_torch_and_match_requirements_txt(config):
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert sorted(config.project.dependencies) == sorted(requirements)
    names = [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements]
    assert not {"torch", "torchvision", "torchaudio"} & set(names)  # ComfyUI's own; a pin can replace CUDA builds


def test_the_package_holds_the_pack_and_nothing_of_the_tests(package):
    for required in ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE",
                     "nodes/__init__.py", "ctrlora_core/__init__.py", "training/__init__.py", "web/ctrlora.js"):
        assert required in package, required
    tracked_code = [f for f in git("ls-files") if f.startswith(PACK_CODE)]
    assert [f for f in tracked_code if f not in package] == []
    assert any(n.startswith("workflows/") and n.endswith(".json") for n in package)
    leaked = [n for n in package if n.startswith(NEVER_SHIPPED) or "__pycache__" in n or n.endswith(".pyc")]
    assert leaked == []
    large = [n for n in package if os.path.getsize(os.path.join(ROOT, n)) > 2_000_000]
    assert large == []


def test_every_module_the_pack_imports_is_in_the_package(package):
    """Relative imports resolve inside the package: nothing the pack runs is left out (e.g. by .comfyignore)."""
    modules = {n[:-3].replace("/", ".") for n in package if n.endswith(".py")}
    modules |= {n[:-len("/__init__.py")].replace("/", ".") for n in package if n.endswith("/__init__.py")}
    modules.add("")  # the pack itself (its __init__.py)
    missing = []
    for name in package:
        if not name.endswith(".py") or name.startswith("scripts/"):
            continue
        package_parts = name[:-3].split("/")[:-1]
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, name), encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package_parts[:len(package_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names]
                if not any(c in modules for c in candidates):
                    missing.append(f"{name}: from {'.' * node.level}{node.module or ''}")
    assert missing == []


# --- scripts: only the test setup installs system packages --------------------------------------------------------

def fake_path(tmp_path):
    """A PATH with the tools the scripts need, no chromium, and package managers that record being called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id", "realpath", "mkdir", "ln", "cat", "grep", "touch", "rm", "mktemp"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found:
            os.symlink(found, bin_dir / tool)
    log = tmp_path / "calls.log"
    for manager in ("apt-get", "apt", "sudo", "dnf", "yum", "brew"):
        (bin_dir / manager).write_text(f'#!/bin/sh\necho "{manager} $*" >> "{log}"\n')
        (bin_dir / manager).chmod(0o755)
    return str(bin_dir), log


def test_run_comfyui_never_installs_system_packages():
    with open(os.path.join(ROOT, "scripts", "run_comfyui.sh"), encoding="utf-8") as f:
        code = [line.split("#")[0] for line in f]
    assert not [line for line in code if any(m in line for m in SYSTEM_PACKAGE_MANAGERS)]
    setups = [line.strip() for line in code if "setup_host.sh" in line]
    assert setups and all(line.endswith("setup_host.sh\" --no-system-packages") for line in setups), setups


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, ".venv", ".ctrlora-setup-v2")),
                    reason="needs the installed host (the script stops before installing anything then)")
def test_the_host_setup_installs_system_packages_only_for_the_tests(tmp_path):
    bin_dir, log = fake_path(tmp_path)
    script = os.path.join(ROOT, "scripts", "setup_host.sh")
    env = {"PATH": bin_dir, "HOME": str(tmp_path)}
    done = subprocess.run(["/bin/bash", script, "--no-system-packages"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert not log.exists(), log.read_text()
    done = subprocess.run(["/bin/bash", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "test setup: installing the system package chromium" in done.stdout
    assert "apt-get install -y -q chromium" in log.read_text()
