"""The evaluation figures README.md and examples/atc/README.md quote, regenerated in one command.

    python benchmarks/atc_results.py --model models/base --shared ../shared/data/atc -o runs/atc_results

Every figure comes from `mlx_moonshine.eval.evaluate` (eval's decoder, audio pipeline and scoring) into a run
folder of its own under OUT (resumable: a finished evaluation is reused):
  * base, greedy, on the shared ATC domain test and heldout: WER/CER, and how many normalised hypotheses equal
    transformers' greedy baseline (`baseline.json` beside the shared manifests, from
    shared/tools/eval_moonshine_wer.py);
  * the same with RMS normalisation to -20 dBFS (what `convert --normalize rms` records in a model folder);
  * beam 4 on the shared heldout set;
  * the bundled example (examples/atc): domain test and heldout WER/CER;
  * WER per TTS engine on the shared sets and per accent on the bundled heldout.
Writes OUT/atc_results.md (the tables) and OUT/atc_results.json. Training figures come from `train` and
benchmarks/guardrails.py (README, "General speech").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import mlx_moonshine  # noqa: F401  (BLAS preload before mlx)

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "atc"


def jsonl(path: Path) -> list[dict]:
    """Every row of a JSONL file (strict: a figure must never silently miss one)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def manifest_rows(path: Path) -> dict:
    """id -> the manifest's own row (engine, speaker_group, ...)."""
    return {str(r["id"]): r for r in jsonl(path)}


def predictions(run: Path) -> list[dict]:
    return jsonl(run / "predictions.jsonl")


def grouped_wer(rows: list[dict], key) -> dict:
    """Corpus WER per group of prediction rows."""
    from mlx_moonshine.metrics import corpus_scores

    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return {g: dict(n=len(rs), wer=corpus_scores(rs)["wer"]) for g, rs in sorted(groups.items())}


def same_as_baseline(rows: list[dict], baseline: dict) -> tuple[int, int]:
    """(normalised hypotheses equal to transformers' baseline, rows compared)."""
    theirs = {u["id"]: u["hyp"] for u in baseline.get("per_utt", [])}
    compared = [r for r in rows if r["id"] in theirs]
    return sum(r["hyp_norm"] == theirs[r["id"]] for r in compared), len(compared)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Moonshine base as an MLX folder (`convert moonshine-cpp:base-en`)")
    ap.add_argument("--shared", required=True, help="the shared ATC data folder (domain_test/heldout manifests)")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--write", default=None, help="also copy the tables here (benchmarks/ATC_RESULTS.md)")
    args = ap.parse_args(argv)

    from mlx_moonshine.decoding import DecodingOptions
    from mlx_moonshine.eval.evaluate import evaluate
    from mlx_moonshine.loading import load

    out, shared = Path(args.out), Path(args.shared)
    model, processor = load(args.model)
    raw_audio = processor.audio

    def run(name, manifests, options=DecodingOptions(), audio=raw_audio) -> dict:
        processor.audio = audio
        summary = evaluate(model, processor, manifests, out / name, options=options, model_path=args.model,
                           progress=False)
        processor.audio = raw_audio
        return summary["manifests"]

    domain, heldout = shared / "domain_test.jsonl", shared / "heldout_manifest.jsonl"
    res = {"greedy": run("shared-greedy", [domain, heldout]),
           "rms": run("shared-rms", [domain, heldout], audio=replace(raw_audio, normalize="rms")),
           "beam": run(f"shared-beam{args.beam}", [heldout], options=DecodingOptions(beam_size=args.beam)),
           "example": run("example-greedy", [EXAMPLE / "domain_test.jsonl", EXAMPLE / "heldout_manifest.jsonl"])}
    baseline = json.loads((shared / "baseline.json").read_text()) if (shared / "baseline.json").is_file() else {}
    greedy_rows = predictions(out / "shared-greedy")
    meta = {**manifest_rows(domain), **manifest_rows(heldout)}
    example_meta = manifest_rows(EXAMPLE / "heldout_manifest.jsonl")

    import time

    lines = ["# ATC evaluation figures\n", f"{time.strftime('%Y-%m-%d')}; `python benchmarks/atc_results.py "
             "--model BASE_MLX --shared data/atc -o OUT` (Moonshine base from moonshine-cpp 0.1.4, fp32; "
             "data/atc is ../shared/data/atc; `eval`'s decoder, audio pipeline and scoring).\n",
             "| check | domain test | heldout |", "|---|---|---|"]
    g, r = res["greedy"], res["rms"]
    same = {n: same_as_baseline([x for x in greedy_rows if x["manifest"] == n], baseline.get(f"{n}.jsonl", {}))
            for n in ("domain_test", "heldout_manifest")}
    lines.append("| base, greedy (`eval` defaults) | " + " | ".join(
        f"{100 * g[n]['wer']:.2f}% WER, {100 * g[n]['cer']:.2f}% CER (n={g[n]['n']})" for n in same) + " |")
    lines.append("| transformers' greedy baseline (baseline.json) | " + " | ".join(
        f"{100 * baseline[f'{n}.jsonl']['wer']:.2f}% WER; {same[n][0]} of {same[n][1]} normalised hypotheses "
        "identical" if f"{n}.jsonl" in baseline else "-" for n in same) + " |")
    lines.append("| RMS normalisation to -20 dBFS | " + " | ".join(f"{100 * r[n]['wer']:.2f}% WER" for n in same) + " |")
    lines.append(f"| beam {args.beam} | - | {100 * res['beam']['heldout_manifest']['wer']:.2f}% WER |")
    ex = res["example"]
    lines += ["", "Bundled example (examples/atc):", "", "| manifest | n | WER | CER |", "|---|---|---|---|"]
    lines += [f"| `{n}.jsonl` | {ex[n]['n']} | {ex[n]['wer']:.3f} | {ex[n]['cer']:.3f} |" for n in ex]
    by_engine = {n: grouped_wer([x for x in greedy_rows if x["manifest"] == n],
                                lambda x: meta.get(x["id"], {}).get("engine", "?")) for n in same}
    engines = sorted({e for groups in by_engine.values() for e in groups})
    lines += ["", "Shared sets by TTS engine (base, greedy):", "", "| manifest | " + " | ".join(engines) + " |",
              "|---|" + "---|" * len(engines)]
    for n, groups in by_engine.items():
        lines.append(f"| {n} | " + " | ".join(f"{groups[e]['wer']:.2f} (n={groups[e]['n']})" if e in groups else "-"
                                               for e in engines) + " |")
    accents = grouped_wer([x for x in predictions(out / "example-greedy") if x["manifest"] == "heldout_manifest"],
                          lambda x: example_meta.get(x["id"], {}).get("speaker_group", "?"))
    lines += ["", "Bundled heldout by accent: " + ", ".join(f"{k} {v['wer']:.2f}" for k, v in accents.items())]
    text = "\n".join(lines) + "\n"
    (out / "atc_results.md").write_text(text)
    if args.write:
        Path(args.write).write_text(text)
    (out / "atc_results.json").write_text(json.dumps(dict(evals=res, same_as_transformers=same, by_engine=by_engine,
                                                          example_heldout_by_accent=accents, command=sys.argv),
                                                     indent=2, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
