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

# Heavy imports stay lazy so that `mlx-moonshine --help` and `import mlx_moonshine`
# are instant; `mlx_moonshine.load` etc. import MLX on first use.
_LAZY = {
    "load": "loading",
    "save": "loading",
    "transcribe": "transcribe",
    "DecodingOptions": "decoding",
    "Model": "model",
    "ModelArgs": "model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'mlx_moonshine' has no attribute {name!r}")
