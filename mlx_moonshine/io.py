"""Atomic file writes and hashing.

Every file the package writes goes to a temporary file in the destination folder first
and is then renamed over the target (`os.replace` is atomic on POSIX and Windows), so an
interrupted run never leaves a half-written config or checkpoint behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path next to `path`; move it onto `path` if the block succeeds."""
    path = Path(path)
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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
