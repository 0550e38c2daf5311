"""Baseline vs tuned on the domain test, the synthetic held-out and the real-speech canary: the README's table.

    python benchmarks/guardrails.py --model models/base --run runs/lora [--run runs/other ...] \
        --manifest data/atc/domain_test.jsonl --manifest data/atc/heldout_manifest.jsonl -o runs/guardrails

Every run is evaluated with the same decoder (`mlx-moonshine eval`'s defaults) into OUT/<run name>, the base
once into OUT/baseline (resumable: re-running reuses finished evals), the real-speech canary beside the given
manifests, and each run is judged with the one verdict rule (`mlx_moonshine.eval.verdict`, as `compare` does).
Writes OUT/guardrails.md (the table and each verdict) and OUT/guardrails.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx_moonshine  # noqa: F401  (BLAS preload before mlx)


def _rows(run_dir: Path, name: str) -> dict:
    out = {}
    for line in (run_dir / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("manifest") == name:
            out[str(r["id"])] = r
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--run", action="append", required=True, help="training run (or adapter) folder; repeat")
    ap.add_argument("--manifest", action="append", required=True, help="domain/heldout manifests; repeat")
    ap.add_argument("--canary", default=None, help="real-speech manifest (default: the built-in canary)")
    ap.add_argument("--domain-target", type=float, default=0.0)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)

    from mlx_moonshine.eval.canary import resolve_canary
    from mlx_moonshine.decoding import DecodingOptions
    from mlx_moonshine.eval.evaluate import evaluate, manifest_name
    from mlx_moonshine.loading import load
    from mlx_moonshine.eval.verdict import Thresholds, assign_roles, format_drift, judge, verdict_line

    out = Path(args.out)
    manifests = [Path(m) for m in args.manifest]
    canary, why = resolve_canary(args.canary, log=print)
    if canary:
        manifests.append(Path(canary))
    names = [manifest_name(m) for m in manifests]
    options = DecodingOptions()

    def run_eval(adapter, folder: Path) -> dict:
        model, processor = load(args.model, adapter=adapter)
        return evaluate(model, processor, manifests, folder, options=options, model_path=args.model,
                        adapter_path=adapter, progress=False)["manifests"]

    base = run_eval(None, out / "baseline")
    roles = assign_roles(names)
    thresholds = Thresholds(domain_min_reduction=args.domain_target)
    results, lines = {}, []
    header = "| run | " + " | ".join(f"{n} WER" for n in names) + " | " + \
             " | ".join(f"{n} drift" for n in names if roles[n] != "domain") + " | verdict |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    lines.append("| base | " + " | ".join(f"{100 * base[n]['wer']:.2f}%" for n in names) + " | " +
                 " | ".join("-" for n in names if roles[n] != "domain") + " | - |")
    for run in args.run:
        label = Path(run).name
        best = Path(run) / "best"
        adapter = str(best if (best / "adapters.safetensors").is_file() else run)
        tuned = run_eval(adapter, out / label)
        drift = {n: format_drift(_rows(out / "baseline", n), _rows(out / label, n)) for n in names
                 if roles[n] != "domain"}
        verdict = judge(base, tuned, roles, thresholds, drift)
        results[label] = dict(adapter=adapter, wer={n: tuned[n]["wer"] for n in names},
                              drift={n: d[0] for n, d in drift.items()},
                              criteria=[c.to_dict() for c in verdict["criteria"]], decision=verdict["decision"])
        cells = []
        for n in names:
            d = 100 * (tuned[n]["wer"] - base[n]["wer"])
            cells.append(f"{100 * tuned[n]['wer']:.2f}% ({d:+.2f})")
        drifts = [f"{100 * drift[n][0]:.1f}% of {drift[n][1]}" if drift[n][0] is not None else "-"
                  for n in names if roles[n] != "domain"]
        status = "PASS" if verdict["decision"] else verdict_line(verdict).split(" (")[0].replace("VERDICT: ", "")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(drifts) + f" | {status} |")
        results[label]["verdict"] = verdict_line(verdict)
    text = "\n".join(lines) + "\n\n" + "\n".join(f"* {k}: {v['verdict']}" for k, v in results.items()) + "\n"
    if not canary:
        text += f"\nreal-speech canary {why}\n"
    (out / "guardrails.md").write_text(text)
    (out / "guardrails.json").write_text(json.dumps(dict(baseline={n: base[n]["wer"] for n in names},
                                                         runs=results, command=sys.argv), indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
