"""mlx-moonshine: Moonshine speech recognition in MLX, built for LoRA/DoRA domain adaptation.

    import mlx_moonshine
    model, processor = mlx_moonshine.load("moonshine-base-mlx")
    print(mlx_moonshine.transcribe(model, processor, "clip.wav"))
"""

from __future__ import annotations

from ._blas import preload as _preload_blas

# Must run before anything imports mlx.core (see _blas.py).
_preload_blas()

__version__ = "0.1.0"

# Heavy imports stay lazy so that `mlx-moonshine --help` and `import mlx_moonshine` are instant;
# `mlx_moonshine.load` etc. import MLX on first use. No public name equals a submodule's name: importing
# a submodule binds it on the package, and would replace the function of the same name.
_LAZY = {
    "load": "loading",
    "save": "loading",
    "transcribe": "transcription",
    "transcribe_clips": "transcription",
    "DecodingOptions": "decoding",
    "Model": "models.moonshine",
    "ModelArgs": "models.moonshine",
    "StreamingModel": "models.streaming",
    "StreamingArgs": "models.streaming",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups find the object itself, never the submodule
        return value
    raise AttributeError(f"module 'mlx_moonshine' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
