"""Real Moonshine weights from PyPI: the pinned wheels that ship them (`moonshine-cpp:base-en`,
`moonshine-voice:tiny-en`), fetched once into the cache with pip (or found installed), and the files
`ort.ort_to_hf` converts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ModelError

Log = Callable[[str], None] | None


def _note(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


# Pinned sources of the model shortcuts (`moonshine-cpp:base-en`, `moonshine-voice:tiny-en`).
MOONSHINE_CPP = ("moonshine-cpp", "0.1.4")  # .ort weights under moonshine_cpp/models/<name>/
MOONSHINE_VOICE = ("moonshine-voice", "0.1.0")  # tiny under moonshine_voice/assets/tiny-en/ (gone in 0.1.1+)
USEFUL_MOONSHINE_ONNX = ("useful-moonshine-onnx", "20251121")  # moonshine_onnx/assets/tokenizer.json


@dataclass(frozen=True)
class Shortcut:
    """A real Moonshine model inside a pinned PyPI wheel: the runtime's own model folder."""

    wheel: tuple[str, str]  # (name, version) on PyPI
    folder: str  # encoder_model.ort, decoder_model_merged.ort, tokenizer.bin below the wheel root
    architecture: str  # the runtime's model type ("tiny" | "base"), as moonshine_cpp names it


SHORTCUTS = {
    "moonshine-cpp:base-en": Shortcut(MOONSHINE_CPP, "moonshine_cpp/models/base-en", "base"),
    "moonshine-voice:tiny-en": Shortcut(MOONSHINE_VOICE, "moonshine_voice/assets/tiny-en", "tiny"),
}
SHORTCUT_PREFIXES = tuple(sorted({spec.split(":")[0] + ":" for spec in SHORTCUTS}))
# The wheels bundle native libraries and are platform-tagged, but the files we read are
# not; ask pip for the Linux x86_64 builds on every host (macOS included).
PIP_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_34_x86_64")
CACHE_ENV = "MLX_MOONSHINE_CACHE"
ENCODER_STEM, DECODER_STEM = "encoder_model", "decoder_model_merged"  # the two graphs of a model folder


# --------------------------------------------------------------------------------------
# Model shortcuts: `moonshine-cpp:base-en`, `moonshine-voice:tiny-en`
# --------------------------------------------------------------------------------------

def cache_root(cache_dir: Path | None = None) -> Path:
    """cache_dir, else $MLX_MOONSHINE_CACHE, else ~/.cache/mlx-moonshine."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlx-moonshine")


def _installed_package_dir(module: str) -> Path | None:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _offline_hint() -> str:
    return ("without PyPI, convert a local Hugging Face Moonshine checkpoint directory instead, or a local "
            f"directory holding {ENCODER_STEM}.ort, {DECODER_STEM}.ort and tokenizer.json")


def _fetch_wheel(package: tuple[str, str], cache: Path, log: Log) -> Path:
    """`pip download --no-deps` one pinned wheel into the cache and unzip it; returns the folder."""
    name, version = package
    unpacked = cache / f"{name}-{version}"
    if (unpacked / ".complete").is_file():
        return unpacked
    cache.mkdir(parents=True, exist_ok=True)
    requirement = f"{name}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "--timeout", "30", "--retries", "2", requirement]
    for platform in PIP_PLATFORMS:
        cmd += ["--platform", platform]
    _note(log, f"downloading {requirement} from PyPI into {cache}")
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=cache) as tmp:
        try:
            res = subprocess.run(cmd + ["--dest", tmp], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelError(f"could not download {requirement} with pip ({e}); {_offline_hint()}") from e
        if res.returncode != 0:
            reason = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "pip failed")
            raise ModelError(f"could not download {requirement} with pip ({reason}); {_offline_hint()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelError(f"pip download {requirement} gave {len(wheels)} wheels, expected 1; {_offline_hint()}")
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(staging)
        (staging / ".complete").write_text(wheels[0].name + "\n")
        if unpacked.exists():  # an earlier, interrupted extraction
            shutil.rmtree(unpacked)
        os.replace(staging, unpacked)
    return unpacked


def _find_in_wheel(root: Path, relative: str) -> Path | None:
    """`relative` below an unpacked wheel, which may hide it under `<name>.data/purelib/`."""
    if (root / relative).exists():
        return root / relative
    hits = sorted(p for p in root.rglob(Path(relative).name) if p.as_posix().endswith("/" + relative))
    return hits[0] if hits else None


def resolve_shortcut(spec: str, cache_dir: Path | None = None, log: Log = None) -> tuple[Path, Path]:
    """Locate the runtime's model folder and the HF tokenizer.json for a model shortcut.

    Uses the installed wheel (`moonshine_cpp`, `moonshine_voice`, `moonshine_onnx`) when it holds
    the files, else `pip download`s the pinned wheel (see SHORTCUTS, useful-moonshine-onnx==20251121
    for tokenizer.json) into the cache and unzips it there.

    Args:
        spec: one of SHORTCUTS (`moonshine-cpp:base-en`, `moonshine-voice:tiny-en`).
        cache_dir: Download cache; default $MLX_MOONSHINE_CACHE or ~/.cache/mlx-moonshine.
        log: Optional callable receiving progress lines.

    Returns:
        (folder holding encoder_model.ort, decoder_model_merged.ort and tokenizer.bin, tokenizer.json path).

    Raises:
        ModelError: unknown name, or the wheels are neither installed nor downloadable.
    """
    shortcut = SHORTCUTS.get(spec)
    if shortcut is None:
        raise ModelError(f"unknown model shortcut {spec!r}; known: {', '.join(SHORTCUTS)}")
    cache = cache_root(cache_dir)

    files = (f"{ENCODER_STEM}.ort", f"{DECODER_STEM}.ort")
    module, _, inside = shortcut.folder.partition("/")
    pkg = _installed_package_dir(module)
    if pkg is not None and all((pkg / inside / f).is_file() for f in files):
        ort_dir = pkg / inside
        version = importlib.metadata.version(shortcut.wheel[0])
        _note(log, f"using installed {shortcut.wheel[0]} {version}: {ort_dir}")
    else:
        wheel = _fetch_wheel(shortcut.wheel, cache, log)
        ort_dir = _find_in_wheel(wheel, shortcut.folder)
        if ort_dir is None or not all((ort_dir / f).is_file() for f in files):
            raise ModelError(f"{wheel}: the {'=='.join(shortcut.wheel)} wheel has no "
                             f"{shortcut.folder}/{{{','.join(files)}}}; delete this folder and retry")

    pkg = _installed_package_dir("moonshine_onnx")
    tokenizer = pkg / "assets" / "tokenizer.json" if pkg is not None else None
    if tokenizer is None or not tokenizer.is_file():
        wheel = _fetch_wheel(USEFUL_MOONSHINE_ONNX, cache, log)
        tokenizer = _find_in_wheel(wheel, "moonshine_onnx/assets/tokenizer.json")
        if tokenizer is None:
            raise ModelError(f"{wheel}: the {'=='.join(USEFUL_MOONSHINE_ONNX)} wheel has no "
                             "moonshine_onnx/assets/tokenizer.json; delete this folder and retry")
    else:
        _note(log, f"using installed moonshine_onnx tokenizer: {tokenizer}")
    return ort_dir, tokenizer


def resolve_moonshine_cpp(spec: str = "moonshine-cpp:base-en", cache_dir: Path | None = None,
                          log: Log = None) -> tuple[Path, Path]:
    """`resolve_shortcut`, defaulting to the base model (the name predates the tiny shortcut)."""
    return resolve_shortcut(spec, cache_dir=cache_dir, log=log)
