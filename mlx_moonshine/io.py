"""Atomic file writes, write errors that name the file, run-folder locks, hashing, appended JSONL read back.

Every file the package writes goes to a temporary file in the destination folder first
and is then renamed over the target (`os.replace` is atomic on POSIX and Windows), so an
interrupted run never leaves a half-written config or checkpoint behind. Finished files and
folders get the permissions the user's umask gives (not tempfile's private 0600/0700), so a
team sharing a machine can read each other's runs.

A failed write (disk full, file-size limit, read-only folder; OSError or MLX's RuntimeError)
becomes an `OutputError` naming the file. A run folder that train or eval writes into is held
with `run_lock`, so two runs never interleave their rows in one folder.

The files that are appended to a line at a time instead (metrics, the teacher's transcripts) are
read back with `read_jsonl`, which leaves out the torn line a killed writer leaves.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from .errors import ModelError, MoonshineError, OutputError, RunLockedError

LOCK_FILE = ".lock"  # in a run folder while a train/eval process writes into it: {"pid", "command", ...}

_FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_problem(path: Path, reason: str, code: Optional[int]) -> str:
    if code in _FULL:
        fix = "free disk space, raise the file-size limit (ulimit -f), or write to another folder"
    elif code in _DENIED:
        fix = "write to a folder you may write to"
    else:
        fix = "the disk may be full or a file-size limit (ulimit -f) reached: free space or write elsewhere"
    return f"cannot write {path}: {reason}; {fix}"


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write inside the block into an `OutputError` that names `path` and the fix."""
    try:
        yield
    except MoonshineError:
        raise
    except OSError as e:
        raise OutputError(_write_problem(Path(path), e.strerror or str(e), e.errno)) from e
    except RuntimeError as e:  # MLX: "[write] Unable to write 30090 bytes to file."
        if not any(w in str(e).lower() for w in ("write", "open", "file")):
            raise
        raise OutputError(_write_problem(Path(path), str(e).rstrip("."), None)) from e


def staged_error(e: OutputError, tmp: Path, final: Path) -> OutputError:
    """`e` with the staging folder `tmp` in its message replaced by the `final` folder the user asked for."""
    return OutputError(str(e).replace(str(tmp), str(final)))


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh staging folder in `parent`, with the permissions mkdir gives (mkdtemp makes it 0700)."""
    parent = Path(parent)
    with writing(parent):
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def prepare_out_dir(out_dir, force: bool) -> Path:
    """`out_dir` as a Path, refusing an existing non-empty folder (or a file) unless `force`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise ModelError(f"{out_dir} already exists and is not empty; pass --force to overwrite it")
    return out_dir


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def swap_in(tmp: Path, dest: Path) -> None:
    """Put the finished folder `tmp` at `dest`: the old `dest` (folder or file) is renamed to `dest.old`
    first and removed after, so at every instant one complete version exists under one of the two names."""
    dest = Path(dest)
    old = dest.with_name(dest.name + ".old")
    if dest.exists() or dest.is_symlink():
        _remove(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    _remove(old)


@contextmanager
def atomic_dir(out_dir, staging_parent=None, prefix: Optional[str] = None) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it replaces `out_dir` (see `swap_in`).

    The staging folder sits beside `out_dir` (or in `staging_parent`), so the final move is a rename on
    one file system. On any failure it is removed and `out_dir` is left as it was; an `OutputError` raised
    inside names `out_dir`, the folder the user asked for, not the staging one.
    """
    out_dir = Path(out_dir)
    tmp = make_temp_dir(Path(staging_parent) if staging_parent is not None else out_dir.parent,
                        prefix or f".{out_dir.name}.")
    try:
        yield tmp
        with writing(out_dir):
            swap_in(tmp, out_dir)
    except OutputError as e:
        raise staged_error(e, tmp, out_dir) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful swap


@contextmanager
def _atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path next to `path`; move it onto `path` if the block succeeds."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            # mkstemp creates 0600 files; give the result the permissions open() would have.
            os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)


atomic_path = _atomic_path  # for writers that need a file name (savefig, safetensors): temp, then rename


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with _atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj, indent: int | None = 2) -> None:
    """Write `obj` as UTF-8 JSON (with a trailing newline) to `path` atomically."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_safetensors(path: Path, arrays: Mapping, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of arrays (all MLX or all numpy) as a safetensors file, atomically.

    Args:
        path: Destination, normally ending in `.safetensors`.
        arrays: Tensor name -> `mx.array` or `np.ndarray`.
        metadata: Optional string metadata stored in the file header.
    """
    import numpy as np

    if all(isinstance(v, np.ndarray) for v in arrays.values()):
        from safetensors.numpy import save_file

        with _atomic_path(path) as tmp:
            save_file(dict(arrays), str(tmp), metadata=metadata)
        return
    import mlx.core as mx

    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    with _atomic_path(path, suffix=".tmp.safetensors") as tmp:
        mx.save_safetensors(str(tmp), dict(arrays), metadata=metadata or {})


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a file appended to one line at a time, leaving out every line that is not one.

    A process killed mid-append leaves a torn last line, and the next append glues its first row onto that
    fragment, so the damage does not stay at the end: lines that are torn, blank, not UTF-8 or not a JSON
    object are left out wherever they are. For files where a lost row costs a recomputation or a plot
    point; eval's predictions.jsonl, whose rows are counted, is read strictly (evaluate, compare).

    Lines end at b"\\n" only: `str.splitlines` would also cut at a U+2028 or U+0085 inside a string.
    """
    rows = []
    for line in Path(path).read_bytes().split(b"\n"):
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- run-folder locks ---------------------------------------------------------------------------


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # alive, owned by someone else
        return True
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    return True


def _read_lock(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process (it has not written its pid yet)"
    where = f" on {holder['host']}" if holder.get("host") else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"pid {holder['pid']}{where} ({holder.get('command', 'mlx-moonshine')}{since})"


def _flock(fd: int) -> Optional[bool]:
    """True: locked; False: another process holds it; None: no flock here (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def run_lock(folder: Path, command: str, log: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    """Hold `folder/.lock` for the block: a second train/eval into the same folder is refused.

    The lock file records the holder's pid. The kernel lock on it (flock) dies with the process, so
    a lock left behind by a killed run is taken over, with a note to `log` (default: stderr).

    Raises:
        RunLockedError: a live process holds the folder; the message names it.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    log = log or (lambda m: print(m, file=sys.stderr))
    created = not folder.exists()
    for _ in range(20):
        with writing(path):
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        got = _flock(fd)
        previous = _read_lock(path)
        if got is None:  # no kernel locks: trust the recorded pid
            got = not previous.get("pid") or previous.get("pid") == os.getpid() or not _pid_alive(previous["pid"])
        if not got:
            os.close(fd)
            raise RunLockedError(
                f"{folder} is in use by {_describe(previous)}, which holds {path}; wait for it to finish or "
                "write this run to another folder (-o). If that process no longer exists, delete the lock file")
        try:  # the holder before us may have removed the file between our open and our lock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise RunLockedError(f"{path}: could not take the lock (it keeps changing); is another run starting?")
    if previous.get("pid"):
        log(f"note: took over the lock of {folder} left by {_describe(previous)}, which is no longer running")
    me = dict(pid=os.getpid(), host=socket.gethostname(), command=f"mlx-moonshine {command}",
              started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        with writing(path):
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(me) + "\n").encode())
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)
            if created and not any(folder.iterdir()):  # refused before writing anything: leave no trace
                with contextlib.suppress(OSError):  # someone else just started writing there
                    folder.rmdir()
        finally:
            os.close(fd)
