"""Writing files so that nothing is lost: one atomic writer for checkpoints, caches, results, figures and CSVs.

Every file tlkit writes goes to a temporary file beside its target (``.<name>.<pid>.<random>.tmp<suffix>``), is
flushed to disk, then renamed over the target: the target is either the old file or the complete new one, never
half-written or empty, whatever happens (a kill, a full disk). A failure to write is a ``SaveError`` that names the
path, the reason and the fix. Temporary files that a killed writer left behind are removed by the next write into
the same folder once they are older than ``STALE_TMP_SECONDS``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STALE_TMP_SECONDS = 3600  # a write in progress (another process) is never that old; a killed one's leftovers are
_TMP_SUFFIX = ".tmp"


class SaveError(OSError):
    """A file could not be written: a folder that cannot be written, a full disk. The message names path and fix.

    Raised inside ``fit`` (as its subclass ``CheckpointSaveError``), ``history`` holds the run's complete epochs.
    """

    history = None


def user_path(path: str | os.PathLike) -> Path:
    """A path as a shell would read it: ``~`` and ``~user`` expanded (never a literal ``./~`` folder)."""
    return Path(os.path.expanduser(os.fspath(path)))


def describe_write_error(path: Path, err: OSError) -> str:
    """One sentence: what could not be written, why, and what to do."""
    reason = err.strerror or type(err).__name__
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why, fix = f"the folder {path.parent} cannot be written", "Choose a path in a folder you can write to (e.g. under your home folder)"
    elif err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
        why, fix = "the disk is full", "Free some space, or choose a path on another disk"
    elif err.errno == errno.ENAMETOOLONG:
        why, fix = "the file name is too long for the file system", "Choose a shorter name"
    elif err.errno == errno.EISDIR or path.is_dir():
        why, fix = f"{path} is a folder", "Name a file, not a folder"
    else:
        why, fix = f"{path.parent} is not a folder that can hold it", "Choose a path in a folder you can write to"
    return f"Could not write {path} ({reason}): {why}. {fix}."


def check_writable_folder(folder: str | os.PathLike, *, what: str = "the output folder") -> Path:
    """Create ``folder`` if needed and check a file can be made in it, before any work is done; ``SaveError`` if not."""
    folder = user_path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tlkit-write-check.{os.getpid()}{_TMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SaveError(f"{what} {folder} cannot be written to ({err.strerror or type(err).__name__}). "
                        f"Choose a folder you can write to.") from err
    return folder


def _file_mode(path: Path) -> int:
    """The permissions ``path`` should get: those it has if it exists, else what the umask gives a new file (0o666 masked)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)  # elsewhere, reading the umask means setting it: put it straight back
    os.umask(umask)
    return umask


def _tmp_prefix(path: Path) -> str:
    return f".{path.stem}."


def remove_stale_tmp(path: Path, *, older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove the temporary files of earlier writes of ``path`` that were killed (older than ``older_than`` seconds)."""
    removed = []
    cutoff = time.time() - older_than
    with contextlib.suppress(OSError):
        for leftover in path.parent.glob(f"{_tmp_prefix(path)}*{_TMP_SUFFIX}{path.suffix}"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
                    removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to, renamed over ``path`` (after an fsync) when the block ends and removed
    on an error: ``path`` is never half-written. The temporary name keeps the suffix (savefig reads the format from it).
    An ``OSError`` becomes a ``SaveError`` naming ``path``."""
    path = user_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaveError(describe_write_error(path, err)) from err
    remove_stale_tmp(path)
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}.{os.urandom(4).hex()}{_TMP_SUFFIX}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):  # a file system without permissions (FAT, some network shares)
            os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, SaveError):
            raise SaveError(describe_write_error(path, err)) from err
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return user_path(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def torch_save_atomically(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory first, then write the bytes atomically.

    Serialising to memory means a full disk surfaces as the operating system's ``OSError`` (and so as a ``SaveError``
    that says the disk is full), not as torch's ``RuntimeError: ... unexpected pos`` from inside its zip writer.
    """
    import torch  # torch is heavy; the text writers above do not need it

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomically(path, buffer.getbuffer())
