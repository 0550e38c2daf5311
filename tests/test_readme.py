"""The README's CLI reference is click's own help (regenerate: python scripts/cli_reference.py --write)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_in_readme_is_current():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    assert mod.section() in readme, "README CLI reference is stale: run python scripts/cli_reference.py --write"


def test_readme_has_the_two_quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    assert "mlx-moonshine quickstart" in readme
    assert 'pip install -e ".[dev,ort]" && python -m pytest' in readme
