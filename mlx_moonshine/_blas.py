"""Make MLX's CPU backend use the system OpenBLAS on Linux.

MLX's Linux wheel links a reference BLAS (~5 GFLOP/s here). Loading OpenBLAS with
RTLD_GLOBAL *before* `mlx.core` is imported makes its sgemm symbols win the dynamic
lookup, which speeds up matmuls and convolutions ~50x. On macOS MLX uses Accelerate
and Metal, so nothing happens there.

Set MLX_MOONSHINE_NO_OPENBLAS=1 to keep MLX's own BLAS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_DISABLE = "MLX_MOONSHINE_NO_OPENBLAS"
# Debian/Ubuntu `libopenblas0-pthread` (and friends) install one of these.
_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

# What `describe()` reports; set once by `preload()`.
_state = {"blas": "not checked"}


def preload() -> str:
    """Load OpenBLAS globally if this is Linux, it exists, and mlx is not imported yet.

    Returns:
        A one-line description of the BLAS MLX will use.
    """
    if not sys.platform.startswith("linux"):
        _state["blas"] = "Accelerate/Metal (macOS)" if sys.platform == "darwin" else "MLX default"
        return _state["blas"]
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        _state["blas"] = f"MLX reference BLAS ({ENV_DISABLE} is set)"
        return _state["blas"]
    if "mlx.core" in sys.modules and _state["blas"] == "not checked":
        _state["blas"] = "MLX reference BLAS (mlx was imported before mlx_moonshine)"
        return _state["blas"]
    if _state["blas"].startswith("OpenBLAS"):
        return _state["blas"]
    found = ctypes.util.find_library("openblas")
    for name in ((found,) if found else ()) + _CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _state["blas"] = f"OpenBLAS ({name})"
        return _state["blas"]
    _state["blas"] = "MLX reference BLAS (install libopenblas0-pthread for ~50x faster matmuls)"
    return _state["blas"]


def describe() -> str:
    """The BLAS in use, as decided by `preload()`."""
    return _state["blas"]
