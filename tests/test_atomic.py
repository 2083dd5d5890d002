"""Writing LoRAs, snapshots and states on any filesystem: never a partial file, never an overwrite, no leftovers.

Filesystems without hard links (exFAT, FAT32, SMB, many FUSE mounts) are simulated by making ``os.link`` fail as
they do; the last resort (no no-replace rename either) by taking that away too.
"""
import errno
import os

import pytest
import safetensors.torch
import torch

import tiny
from conftest import pack
from training_helpers import config, golden_base, trainer, write_pairs

atomic = pack.ctrlora_core.atomic
checkpoint = pack.ctrlora_core.checkpoint
state = pack.training.state
CtrLoRAError = pack.ctrlora_core.CtrLoRAError

NO_LINKS = [errno.EPERM, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.ENOSYS]


def without_links(monkeypatch, code=errno.EPERM):
    def link(src, dst, *args, **kwargs):
        raise OSError(code, os.strerror(code), src, None, dst)
    monkeypatch.setattr(os, "link", link)


def without_no_replace_rename(monkeypatch):
    monkeypatch.setattr(atomic, "_libc_rename_call", lambda: None)


@pytest.fixture(params=["hard links", "no hard links", "no hard links, no no-replace rename"])
def filesystem(request, monkeypatch):
    """Each kind of filesystem the publish step meets."""
    if request.param != "hard links":
        without_links(monkeypatch)
    if request.param.endswith("no no-replace rename"):
        without_no_replace_rename(monkeypatch)
    return request.param


def write_bytes(data, fail_after=None):
    """A writer for ``atomic``: writes ``data``; with ``fail_after`` it writes that many bytes, then fails."""
    def write(path):
        with open(path, "wb") as f:
            f.write(data if fail_after is None else data[:fail_after])
            if fail_after is not None:
                f.flush()
                raise RuntimeError("disk pulled out mid-write")
    return write


def listing(folder):
    return sorted(os.listdir(folder))


def test_a_new_file_is_written_whole_and_leaves_no_temporary_file(tmp_path, filesystem):
    atomic.write_new(str(tmp_path / "new.safetensors"), write_bytes(b"x" * 1000))
    assert (tmp_path / "new.safetensors").read_bytes() == b"x" * 1000
    assert listing(tmp_path) == ["new.safetensors"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not 0600


def test_an_existing_file_is_never_overwritten(tmp_path, filesystem):
    (tmp_path / "taken.safetensors").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        atomic.write_new(str(tmp_path / "taken.safetensors"), write_bytes(b"new"))
    assert (tmp_path / "taken.safetensors").read_bytes() == b"precious" and listing(tmp_path) == ["taken.safetensors"]


def test_a_file_that_appears_while_writing_is_not_overwritten(tmp_path, filesystem):
    """Another writer takes the name between the first check and the publish: the publish itself refuses."""
    target = tmp_path / "raced.safetensors"

    def write(path):
        write_bytes(b"mine")(path)
        target.write_bytes(b"theirs")

    with pytest.raises(FileExistsError):
        atomic.write_new(str(target), write)
    assert target.read_bytes() == b"theirs" and listing(tmp_path) == ["raced.safetensors"]


@pytest.mark.parametrize("code", NO_LINKS)
def test_every_way_a_filesystem_refuses_hard_links_falls_back(tmp_path, monkeypatch, code):
    without_links(monkeypatch, code)
    atomic.write_new(str(tmp_path / "a.bin"), write_bytes(b"a"))
    assert listing(tmp_path) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"a"


def test_a_dangling_link_under_the_name_counts_as_taken(tmp_path, filesystem):
    os.symlink(tmp_path / "nowhere", tmp_path / "link.safetensors")
    with pytest.raises(FileExistsError):
        atomic.write_new(str(tmp_path / "link.safetensors"), write_bytes(b"new"))
    assert listing(tmp_path) == ["link.safetensors"] and not (tmp_path / "nowhere").exists()


def test_a_crash_mid_write_leaves_nothing_under_the_name(tmp_path, filesystem):
    with pytest.raises(RuntimeError, match="mid-write"):
        atomic.write_new(str(tmp_path / "new.safetensors"), write_bytes(b"x" * 1000, fail_after=10))
    assert listing(tmp_path) == []


def test_replace_is_atomic_and_a_crash_keeps_the_old_file(tmp_path, filesystem):
    path = tmp_path / "state.json"
    atomic.write_replace(str(path), write_bytes(b"old"))
    with pytest.raises(RuntimeError, match="mid-write"):
        atomic.write_replace(str(path), write_bytes(b"new state", fail_after=3))
    assert path.read_bytes() == b"old" and listing(tmp_path) == ["state.json"]
    atomic.write_replace(str(path), write_bytes(b"new state"))
    assert path.read_bytes() == b"new state" and listing(tmp_path) == ["state.json"]


def test_the_file_and_its_folder_are_flushed_to_disk(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def record(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic.write_new(str(tmp_path / "a.bin"), write_bytes(b"a"))
    assert len(synced) == 2
    if os.path.exists("/proc/self/fd"):
        assert os.path.basename(synced[0]).startswith(atomic.TEMP_PREFIX) and synced[1] == str(tmp_path.resolve())


def test_the_no_replace_rename_of_this_os(tmp_path):
    """The publish hard-link-less filesystems use (renameat2 / renamex_np / Windows rename), for real."""
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    (tmp_path / "c").write_bytes(b"c")
    if not atomic._rename_no_replace(str(tmp_path / "a"), str(tmp_path / "new")):
        pytest.skip("no no-replace rename on this OS/filesystem (the exclusive-create fallback is tested above)")
    with pytest.raises(FileExistsError):
        atomic._rename_no_replace(str(tmp_path / "b"), str(tmp_path / "c"))
    assert listing(tmp_path) == ["b", "c", "new"] and (tmp_path / "c").read_bytes() == b"c"


# --- the pack's writers -----------------------------------------------------------------------------------------------

def test_save_lora_file_without_hard_links(tmp_path, filesystem):
    tensors = {"zero_convs.0.0.weight": torch.ones(2, 2)}
    path = tmp_path / "cond.safetensors"
    checkpoint.save_lora_file(tensors, str(path), {"steps": 3})
    assert torch.equal(safetensors.torch.load_file(str(path))["control_model.zero_convs.0.0.weight"], torch.ones(2, 2))
    with pytest.raises(CtrLoRAError, match="cond.safetensors: already exists"):
        checkpoint.save_lora_file({"zero_convs.0.0.weight": torch.zeros(2, 2)}, str(path))
    assert torch.equal(safetensors.torch.load_file(str(path))["control_model.zero_convs.0.0.weight"], torch.ones(2, 2))
    assert listing(tmp_path) == ["cond.safetensors"]


def test_save_lora_file_crash_mid_write(tmp_path, monkeypatch):
    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_lora_file({"a": torch.ones(1)}, str(tmp_path / "cond.safetensors"))
    assert listing(tmp_path) == []


def test_a_state_write_that_fails_keeps_the_previous_state(tmp_path, monkeypatch, filesystem):
    state.write_state(str(tmp_path), 1, {"w": torch.ones(2)}, {"config": {}})
    before = {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)}
    calls = []
    dump = state.json.dump

    def failing_dump(document, f):
        calls.append(1)
        f.write('{"version": 1, "st')
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(state.json, "dump", failing_dump)
    with pytest.raises(OSError, match="I/O error"):
        state.write_state(str(tmp_path), 2, {"w": torch.zeros(2)}, {"config": {}})
    monkeypatch.setattr(state.json, "dump", dump)
    assert calls
    # The new tensors file may be there (named by no state.json yet); the state that resumes is still step 1.
    document, tensors = state.load_state(str(tmp_path))
    assert document["step"] == 1 and torch.equal(tensors["w"], torch.ones(2))
    assert (tmp_path / "state.json").read_bytes() == before["state.json"]
    assert not [n for n in listing(tmp_path) if n.startswith(atomic.TEMP_PREFIX)]


def test_a_training_run_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    """The worst case (no links, no no-replace rename): the final LoRA and the snapshots are written whole, nothing
    temporary is left, and an existing output is never replaced."""
    without_links(monkeypatch)
    without_no_replace_rename(monkeypatch)
    dataset, out = write_pairs(str(tmp_path / "data"), 4), tmp_path / "out"
    out.mkdir()
    (out / "taken.safetensors").write_bytes(b"precious")

    def run(name):
        return trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, name,
                       config=config(steps=2, save_every=1, validation_fraction=0.0)).run()

    result = run("exfat")
    assert listing(out) == ["exfat.safetensors", "exfat.train", "taken.safetensors"]
    snapshots = listing(out / "exfat.train")
    assert snapshots and all(n.startswith("exfat_step") and n.endswith(".safetensors") for n in snapshots)
    for path in [result.path] + [str(out / "exfat.train" / n) for n in snapshots]:
        assert safetensors.torch.load_file(path)
    with pytest.raises(CtrLoRAError, match="already exists"):
        run("taken")
    assert (out / "taken.safetensors").read_bytes() == b"precious"
