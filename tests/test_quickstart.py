"""quickstart orchestration on a tiny model and corpus: every artefact, and a re-run that reuses them."""

import json

from conftest import write_tiny_corpus

from mlx_moonshine.quickstart import quickstart


def test_quickstart_end_to_end_and_rerun(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    for name, n in (("domain_train", 8), ("domain_val", 4), ("domain_test", 4), ("heldout_manifest", 4)):
        write_tiny_corpus(data, name, n, seed=n)
    out = tmp_path / "qs"
    lines = []
    summary = quickstart(out, minutes=5, steps=4, data_dir=data, model_source=str(tiny_model_dir),
                         log=lines.append)
    for key in ("model", "baseline", "run", "report", "compare", "peft"):
        path = summary["artefacts"][key]
        assert (out / path).exists() or __import__("pathlib").Path(path).exists(), key
    assert (out / "lora" / "loss.png").is_file() and (out / "lora" / "report.md").is_file()
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert any("VERDICT" in line for line in lines)
    assert [r[0] for r in summary["rows"]] == ["domain_test", "heldout_manifest"]

    again = []
    quickstart(out, minutes=5, steps=4, data_dir=data, model_source=str(tiny_model_dir), log=again.append)
    assert any("reusing" in line and "model" in line for line in again)
    assert any("reusing finished run" in line for line in again)
