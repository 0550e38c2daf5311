"""The README's Python examples run as written, and the public API returns the same objects on every access.

The snippets are taken from README.md itself and run in a folder laid out like theirs (models/base,
runs/lora, a.wav, b.wav) with a tiny random model, so a README edit that breaks them fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import mlx_moonshine

README = Path(__file__).resolve().parents[1] / "README.md"
PUBLIC = ["load", "save", "transcribe", "transcribe_clips", "DecodingOptions", "Model", "ModelArgs",
          "StreamingModel", "StreamingArgs"]


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def readme_folder(tiny_model_dir, tmp_path_factory) -> Path:
    from mlx_moonshine.adapters.apply import AdapterConfig, apply_adapters, save_adapters
    from mlx_moonshine.loading import load

    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(tiny_model_dir, root / "models" / "base")
    model, _ = load(root / "models" / "base")
    apply_adapters(model, AdapterConfig(r=2))
    save_adapters(root / "runs" / "lora", model, AdapterConfig(r=2))
    rng = np.random.default_rng(0)
    for name, seconds in (("a.wav", 1.2), ("b.wav", 0.8)):
        sf.write(root / name, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    return root


def test_readme_has_python_snippets():
    snippets = python_snippets()
    assert len(snippets) >= 2 and any("for path in" in s for s in snippets)  # the loop people write first


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_readme_python_snippet_runs(index, readme_folder):
    """Each snippet in a fresh interpreter (a fresh package: the lazy names are resolved for the first time)."""
    code = python_snippets()[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=readme_folder, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if "for path in" in code:  # the loop printed one transcript per file, the batch and beam lines too
        lines = out.stdout.splitlines()
        assert [ln.split(" ", 1)[0] for ln in lines[:2]] == ["a.wav", "b.wav"], out.stdout


ORDERS = {
    "as listed": PUBLIC,
    "reversed": PUBLIC[::-1],
    "submodules imported first": ["import mlx_moonshine.transcription, mlx_moonshine.loading, "
                                  "mlx_moonshine.decoding, mlx_moonshine.models.moonshine, mlx_moonshine.models.streaming",
                                  *PUBLIC],
}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_every_public_name_is_the_same_object_on_every_access(order):
    """Two accesses of every public name, in several orders of first use, in a fresh interpreter."""
    lines = ["import json, mlx_moonshine", "seen = {}"]
    for item in ORDERS[order]:
        if item.startswith("import "):
            lines.append(item)
            continue
        lines.append(f"a = mlx_moonshine.{item}; b = getattr(mlx_moonshine, {item!r})")
        lines.append(f"seen[{item!r}] = [a is b, type(a).__name__, callable(a)]")
    lines.append("print(json.dumps(seen))")
    out = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout)
    for name in PUBLIC:
        same, kind, is_callable = seen[name]
        assert same and kind != "module" and is_callable, (name, seen[name])


def test_transcribe_twice_in_process(tiny_model_dir, readme_folder):
    """The issue's snippet: two calls of mlx_moonshine.transcribe in one process."""
    model, processor = mlx_moonshine.load(tiny_model_dir)
    first = mlx_moonshine.transcribe(model, processor, str(readme_folder / "a.wav"))
    second = mlx_moonshine.transcribe(model, processor, str(readme_folder / "b.wav"))
    assert isinstance(first, str) and isinstance(second, str)
    assert mlx_moonshine.transcribe(model, processor, [str(readme_folder / "a.wav")]) == [first]


def test_dir_lists_the_public_api():
    names = dir(mlx_moonshine)
    assert all(name in names for name in PUBLIC) and "__version__" in names
    assert set(PUBLIC) <= set(mlx_moonshine.__all__)


def test_cli_reference_in_readme_is_current():
    """The README's CLI reference is click's own help (regenerate: python scripts/cli_reference.py --write)."""
    import importlib.util

    root = README.parent
    spec = importlib.util.spec_from_file_location("cli_reference", root / "scripts" / "cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.section() in README.read_text(), "README CLI reference is stale: run python scripts/cli_reference.py --write"


def test_readme_has_the_two_quick_start_commands():
    readme = README.read_text()
    assert "mlx-moonshine quickstart" in readme
    assert 'pip install -e ".[dev,ort]" && python -m pytest' in readme
