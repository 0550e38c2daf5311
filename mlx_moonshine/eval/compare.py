"""Compare two evaluation runs (A = baseline, B = candidate) and decide whether B may replace A.

The verdict (last line of the report) is the project's one rule (`verdict.py`, shared with report.md):
domain manifests pooled must improve by the user's threshold (default: not get worse), every held-out and
real-canary manifest may rise by at most its limit (default 1.0 absolute WER point) and keep the base's
casing/punctuation (format drift), and a criterion with no set to measure it is NOT MEASURED, never PASS.
Runs decoded or normalised differently, or on different manifest bytes, are still compared, with a loud
warning: their numbers are not comparable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .evaluate import PREDICTIONS_FILE, RUN_FILE, SUMMARY_FILE, EvalError
from .verdict import Thresholds, assign_roles, format_drift, judge, verdict_line

TOP_REGRESSIONS = 10
_SETTINGS = (("decoding", "decode options"), ("audio_normalization", "audio normalisation"),
             ("text_normalizer", "text normaliser"))


def _load_run(run_dir: str | Path) -> tuple[dict, dict, dict]:
    """(run.json, summary.json, {(manifest, id): row}) of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"{run_dir}: no such run folder; pass a folder written by `mlx-moonshine eval -o`")
    parts = []
    for name in (RUN_FILE, SUMMARY_FILE):
        path = run_dir / name
        if not path.is_file():
            raise EvalError(f"{path} is missing; is {run_dir} a finished `mlx-moonshine eval` run? "
                            "Re-run eval with the same -o to complete it")
        try:
            parts.append(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{path}: not valid JSON ({e}); re-run eval into a new folder") from e
        if not isinstance(parts[-1], dict):
            raise EvalError(f"{path}: not an `mlx-moonshine eval` file (expected a JSON object); "
                            "re-run eval into a new folder")
    manifests = parts[1].get("manifests")
    bad = ([] if isinstance(manifests, dict) else ["manifests"]) + [
        name for name, m in (manifests or {}).items() if not isinstance(m, dict) or not {"wer", "cer", "n"} <= set(m)]
    if bad:
        raise EvalError(f"{run_dir / SUMMARY_FILE}: no WER/CER/n for {', '.join(map(str, bad))}; "
                        "re-run eval with the same -o to rewrite it")
    rows = {}
    pred = run_dir / PREDICTIONS_FILE
    if pred.is_file():
        try:
            text = pred.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EvalError(f"{pred}: not UTF-8 text ({e.reason}); re-run eval into a new folder") from e
        for i, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a transcript
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                # A torn line (an interrupted eval): per-sample numbers would silently miss that row.
                raise EvalError(f"{pred}: line {i} is incomplete or not JSON ({e.msg}); finish the run with "
                                f"`mlx-moonshine eval` and the same -o {run_dir} (it repairs the file), "
                                "then compare again") from e
            if not isinstance(r, dict):
                raise EvalError(f"{pred}: line {i} is not a prediction row (a JSON object); "
                                "re-run eval into a new folder")
            rows[(r.get("manifest"), str(r.get("id")))] = r
    return parts[0], parts[1], rows


def _errors(row: dict) -> int:
    return int(row["substitutions"] + row["deletions"] + row["insertions"])


def _manifest_section(name: str, sa: dict, sb: dict, rows_a: dict, rows_b: dict) -> list[str]:
    lines = [f"== {name} ==",
             f"  WER  A {100 * sa['wer']:6.2f}%   B {100 * sb['wer']:6.2f}%   "
             f"delta {100 * (sb['wer'] - sa['wer']):+6.2f} pts",
             f"  CER  A {100 * sa['cer']:6.2f}%   B {100 * sb['cer']:6.2f}%   "
             f"delta {100 * (sb['cer'] - sa['cer']):+6.2f} pts",
             f"  n    A {sa['n']}   B {sb['n']}"]
    ids_a = {i for (m, i) in rows_a if m == name}
    ids_b = {i for (m, i) in rows_b if m == name}
    common = sorted(ids_a & ids_b)
    if ids_a != ids_b:
        lines.append(f"  note: {len(ids_a - ids_b)} ids only in A, {len(ids_b - ids_a)} only in B; "
                     f"per-sample numbers use the {len(common)} in both")
    pairs = [(rows_a[(name, i)], rows_b[(name, i)]) for i in common]
    deltas = [(b["wer"] - a["wer"], _errors(b) - _errors(a), a, b) for a, b in pairs]
    improved = sum(d < 0 for d, *_ in deltas)
    regressed = sum(d > 0 for d, *_ in deltas)
    lines.append(f"  per sample: {improved} improved, {len(deltas) - improved - regressed} unchanged, "
                 f"{regressed} regressed")
    worst = sorted((x for x in deltas if x[0] > 0), key=lambda x: (-x[0], -x[1], x[2]["id"]))[:TOP_REGRESSIONS]
    if worst:
        lines.append(f"  worst regressions (top {len(worst)}):")
        for d, de, a, b in worst:
            lines += [f"    {a['id']}  WER {100 * a['wer']:.0f}% -> {100 * b['wer']:.0f}% ({de:+d} errors)",
                      f"      ref   : {a.get('ref_norm', a.get('ref', ''))}",
                      f"      hyp A : {a.get('hyp_norm', a.get('hyp', ''))}",
                      f"      hyp B : {b.get('hyp_norm', b.get('hyp', ''))}"]
    rows_in_b = [r for (m, _), r in rows_b.items() if m == name]
    left = sum(_errors(r) for r in rows_in_b)
    with_errors = sum(_errors(r) > 0 for r in rows_in_b)
    lines.append(f"  headroom in B: {left} word errors left; {with_errors} of {len(rows_in_b)} samples "
                 "still have errors")
    return lines


def compare_runs(run_a: str | Path, run_b: str | Path, max_heldout_regression: float = 1.0,
                 heldout: Optional[str] = None, canary: Optional[str] = None,
                 thresholds: Optional[Thresholds] = None) -> tuple[str, bool]:
    """Compare run B against run A, manifest by manifest, and give the verdict (`verdict.judge`).

    Args:
        run_a: Baseline run folder (from `evaluate`).
        run_b: Candidate run folder.
        max_heldout_regression: Largest allowed WER increase on held-out manifests, in absolute
            percentage points (1.0 = 0.01 WER); ignored when `thresholds` is given.
        heldout: Name of the held-out manifest; default: every manifest whose name contains "heldout".
        canary: Name of the real-speech canary manifest; default: every name containing "canary".
        thresholds: All thresholds of the verdict (domain, held-out, canary, format drift).

    Returns:
        (report text whose last line is "VERDICT: PASS|FAIL|NOT MEASURED ...", passed)

    Raises:
        EvalError: a missing or unreadable run folder, no manifest in common, or an unknown `heldout`.
    """
    thresholds = thresholds or Thresholds(heldout_max_rise=max_heldout_regression)
    run1, sum_a, rows_a = _load_run(run_a)
    run2, sum_b, rows_b = _load_run(run_b)
    man_a, man_b = sum_a.get("manifests", {}), sum_b.get("manifests", {})
    names = [n for n in man_a if n in man_b]
    if not names:
        raise EvalError(f"{run_a} ({', '.join(man_a) or 'nothing'}) and {run_b} ({', '.join(man_b) or 'nothing'}) "
                        "have no manifest in common; evaluate both on the same manifests")
    for flag, value in (("--heldout", heldout), ("--canary", canary)):
        if value is not None and value not in names:
            raise EvalError(f"{flag} {value!r} is not a manifest of both runs (common: {', '.join(names)})")
    lines = [f"A: {run_a}", f"B: {run_b}"]
    warnings = [f"{label} differ: A {run1.get(key)} vs B {run2.get(key)}"
                for key, label in _SETTINGS if run1.get(key) != run2.get(key)]
    for n in names:
        sha_a = (run1.get("manifests", {}).get(n) or {}).get("sha256")
        sha_b = (run2.get("manifests", {}).get(n) or {}).get("sha256")
        if sha_a != sha_b:
            warnings.append(f"manifest '{n}' differs: sha256 A {str(sha_a)[:12]} vs B {str(sha_b)[:12]}")
    for w in warnings:
        lines.append(f"!!! WARNING: {w}; the runs are NOT comparable as they stand")
    only = sorted(set(man_a) ^ set(man_b))
    if only:
        lines.append(f"note: not in both runs, not compared: {', '.join(only)}")
    for n in names:
        lines += _manifest_section(n, man_a[n], man_b[n], rows_a, rows_b)

    roles = assign_roles(names, heldout=heldout, canary=canary)
    drift = {}
    for n, role in roles.items():
        if role != "domain":
            drift[n] = format_drift({i: r for (m, i), r in rows_a.items() if m == n},
                                    {i: r for (m, i), r in rows_b.items() if m == n})
    result = judge(man_a, man_b, roles, thresholds, drift)
    lines.append("criteria:")
    lines += [f"  {c.line()}" for c in result["criteria"]]
    if warnings:
        lines.append("  (settings differ, see warnings)")
    lines.append(verdict_line(result))
    return "\n".join(lines), result["decision"]
