"""Writing files that readers only ever see whole, on any filesystem.

Both functions let ``write(temp_path)`` write a temporary file in the destination's folder, flush it to disk,
then publish it under its final name in one step and flush the folder (where the OS allows):

* ``write_new``: never replaces an existing file (raises ``FileExistsError``). Publishing tries, in order, a
  hard link (POSIX filesystems that have them), a no-replace rename (Windows ``rename``, Linux ``renameat2``
  with ``RENAME_NOREPLACE``, macOS ``renamex_np`` with ``RENAME_EXCL``: these cover exFAT, FAT32 and SMB, where
  hard links fail), and last an exclusive create of the final name replaced at once by the finished file (only
  there a crash between those two calls can leave an empty file, never a partial one, under the final name).
* ``write_replace``: replaces the file atomically (``os.replace``).

If ``write`` fails, nothing appears under the final name and the temporary file is removed.
"""
import ctypes
import ctypes.util
import errno
import functools
import os
import secrets
import sys

TEMP_PREFIX = ".partial-"  # hidden, and without a model extension: model lists never offer a temporary file
# Errors that mean "this filesystem (or OS) cannot do that here", as opposed to a real failure.
_UNSUPPORTED = {errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EMLINK, errno.EACCES,
                getattr(errno, "ENOTSUP", errno.EINVAL), getattr(errno, "EOPNOTSUPP", errno.EINVAL)}
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCL = 4  # macOS sys/stdio.h
_AT_FDCWD = -100


def write_new(path, write):
    """Publishes the file ``write(temp_path)`` writes as ``path``; ``FileExistsError`` if ``path`` exists (also
    when it appeared while writing). Nothing is ever overwritten."""
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", path)
    _write(path, write, _publish_new)


def write_replace(path, write):
    """Publishes the file ``write(temp_path)`` writes as ``path``, atomically replacing an existing one."""
    _write(path, write, os.replace)


def remove_leftovers(folder):
    """Removes the temporary files a killed writer left in ``folder``. Only where no other writer can be at work
    (one training run owns its run folder)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TEMP_PREFIX):
                os.unlink(os.path.join(folder, name))


def _write(path, write, publish):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = _new_temp(folder)
    try:
        write(temp)
        _fsync_file(temp)
        publish(temp, path)
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    _fsync_folder(folder)


def _new_temp(folder):
    """An empty temporary file, with the permissions a new file gets here (mkstemp's would be owner-only)."""
    while True:
        temp = os.path.join(folder, TEMP_PREFIX + secrets.token_hex(8))
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue


def _publish_new(temp, path):
    if os.name != "nt":  # on Windows, rename below is the no-replace publish; link there works on NTFS only
        try:
            os.link(temp, path)
            return  # the caller removes the temporary name
        except FileExistsError:
            raise
        except (OSError, AttributeError, NotImplementedError):
            pass  # no hard links here (exFAT, FAT32, SMB, many FUSE mounts)
    if _rename_no_replace(temp, path):
        return
    # Last resort: reserve the name exclusively, then put the finished file in its place.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(path)  # our own empty reservation
        raise


def _rename_no_replace(temp, path):
    """Renames without replacing: True when done, False where the OS or filesystem cannot; FileExistsError."""
    if os.name == "nt":
        os.rename(temp, path)  # never replaces on Windows
        return True
    call = _libc_rename_call()
    if call is None:
        return False
    if call(os.fsencode(temp), os.fsencode(path)) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise FileExistsError(code, "file exists", path)
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), path)


@functools.lru_cache(maxsize=1)
def _libc_rename_call():
    """``f(src, dst) -> 0 or -1`` renaming without replacing, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if sys.platform.startswith("linux"):
            renameat2 = libc.renameat2
            renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            return lambda src, dst: renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE)
        if sys.platform == "darwin":
            renamex_np = libc.renamex_np
            renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            return lambda src, dst: renamex_np(src, dst, _RENAME_EXCL)
    except (OSError, AttributeError):  # no C library, or one without the call (glibc < 2.28)
        pass
    return None


def _fsync_file(path):
    fd = os.open(path, os.O_RDWR)  # Windows flushes only files open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder):
    """Makes the new name durable where folders can be flushed (POSIX; not Windows, not every network mount)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. EINVAL on some FUSE and SMB mounts: the file itself is already on disk
    finally:
        os.close(fd)
