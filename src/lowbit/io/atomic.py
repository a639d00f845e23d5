"""Every output is written to a hidden temporary sibling and renamed into place when complete: an error,
Ctrl-C or SIGTERM removes the temporary, a full disk is one line, and permissions follow the umask."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError


def check_output(out, what: str = "output") -> Path:
    """`out` may be written: it does not exist and its parent is (or can be made) a writable folder.
    Called before any work, so a bad path is reported in seconds, not after the quantisation."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise LowbitError(f"{what} already exists: {out}")
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink():        # dangling or looping: mkdir would fail after the work
            raise LowbitError(f"cannot write {out}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"cannot write {out}: {parent} is a file, not a folder")
    _check_name_lengths(out, parent)
    error = _creation_error(parent) if os.access(parent, os.W_OK | os.X_OK) else PermissionError()
    if error is not None:
        if no_space(error, parent):
            raise LowbitError(f"cannot write {out}: no space left on the device of {parent}")
        raise LowbitError(f"cannot write {out}: {parent} is not writable")
    return out


def _check_name_lengths(out: Path, parent: Path) -> None:
    """Every folder still to be made, and the hidden temporary the output is first written as (its name
    plus TEMP_EXTRA characters), fit the file system's name limit."""
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    parts = out.relative_to(parent).parts
    for i, part in enumerate(parts):
        extra = TEMP_EXTRA if i == len(parts) - 1 else 0
        if len(os.fsencode(part)) + extra > limit:
            raise LowbitError(f"cannot write {out}: the name {part[:40]}... is too long for the file system "
                              f"({len(os.fsencode(part))} bytes; at most {limit - extra})")


# ".{name}." + tempfile's 8 random characters + ".tmp": what atomic_output adds to the output's name
TEMP_EXTRA = 2 + 8 + 4


def _creation_error(folder: Path) -> OSError | None:
    """Why a folder, and a file in it, cannot really be made there (None: they can): os.access answers yes to
    root on any mode bits and to pseudo and some network file systems that then refuse the write."""
    probe = None
    try:
        probe = tempfile.mkdtemp(prefix=".lowbit-probe-", dir=folder)
        Path(probe, "f").touch()
    except OSError as e:
        return e
    finally:
        if probe is not None:
            shutil.rmtree(probe, ignore_errors=True)
    return None


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# errors that say what is wrong themselves, even on a device that reports no free space (pseudo file systems)
NOT_SPACE = (errno.EPERM, errno.EACCES, errno.EROFS, errno.EEXIST, errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP,
             errno.ENOENT)


def no_space(e: BaseException, where: Path | None = None) -> bool:
    """A full disk, whether reported as OSError, as a library's own error with the OS message, or as a
    short write (numpy's "N requested and M written") on a device with no room left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, OSError) and e.errno in NOT_SPACE:
        return False
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
        return True
    try:
        return isinstance(e, OSError) and where is not None and shutil.disk_usage(where).free < 2 ** 20
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(out, folder: bool):
    """Yield a temporary sibling of `out` (a folder when `folder`, else a file path not yet created) that
    becomes `out` when the block completes; removed on any exception, KeyboardInterrupt or SystemExit."""
    out = check_output(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            tmp.chmod(0o777 & ~umask())
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            os.close(fd)
            tmp = Path(name)
            tmp.chmod(0o666 & ~umask())
    except OSError as e:
        raise _one_line(e, out) from e
    try:
        yield tmp
        _follow_umask(tmp)
        if out.exists():
            raise LowbitError(f"output already exists: {out} (written by something else meanwhile)")
        os.replace(tmp, out)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, Exception) and no_space(e, out.parent):
            raise LowbitError(f"no space left on device writing {out}") from e
        raise


def _follow_umask(path: Path) -> None:
    """Give what was written the umask's permissions (some writers, safetensors among them, create 0600)."""
    mask = umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _one_line(e: BaseException, out: Path) -> BaseException:
    if no_space(e):
        return LowbitError(f"no space left on device writing {out}")
    if isinstance(e, OSError):
        return LowbitError(f"cannot write {out}: {e.strerror or e}")
    return e


def write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically (replacing an existing file is allowed)."""
    path = Path(path)
    if path.exists():  # a deliberate overwrite by the caller: write beside it, then replace
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            raise _one_line(e, path) if isinstance(e, OSError) else e
        return
    with atomic_output(path, folder=False) as tmp:
        tmp.write_bytes(data)
