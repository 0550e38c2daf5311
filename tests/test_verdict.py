"""The one verdict rule (verdict.py): roles, thresholds, format drift, and "not measured" is never yes."""

from __future__ import annotations

from mlx_moonshine.eval.verdict import Thresholds, assign_roles, format_drift, judge, style, verdict_line


def _s(wer, words=100):
    return dict(wer=wer, ref_words=words, word_errors=round(wer * words), n=10)


BASE = {"domain_test": _s(0.8), "heldout": _s(0.12), "real_canary": _s(0.12)}


def test_roles_come_from_names_unless_given():
    assert assign_roles(["domain_test", "heldout_manifest", "real_canary"]) == \
        {"domain_test": "domain", "heldout_manifest": "heldout", "real_canary": "canary"}
    assert assign_roles(["a", "b", "c"], heldout="b", canary="c") == {"a": "domain", "b": "heldout", "c": "canary"}


def test_every_criterion_measured_and_passing_is_yes():
    tuned = {"domain_test": _s(0.2), "heldout": _s(0.125), "real_canary": _s(0.12)}
    drift = {"heldout": (0.0, 10), "real_canary": (0.04, 10)}
    out = judge(BASE, tuned, assign_roles(BASE), Thresholds(domain_min_reduction=0.75), drift)
    assert out["decision"] and not out["not_measured"]
    assert verdict_line(out).startswith("VERDICT: PASS") and "real_canary (real canary)" in verdict_line(out)


def test_each_threshold_can_fail_the_verdict():
    roles = assign_roles(BASE)
    ok = {"heldout": (0.0, 10), "real_canary": (0.0, 10)}
    cases = [
        ({"domain_test": _s(0.3), "heldout": _s(0.12), "real_canary": _s(0.12)}, ok, "domain WER"),  # -62% < 75%
        ({"domain_test": _s(0.1), "heldout": _s(0.14), "real_canary": _s(0.12)}, ok, "held-out"),
        ({"domain_test": _s(0.1), "heldout": _s(0.12), "real_canary": _s(0.14)}, ok, "real canary WER"),
        ({"domain_test": _s(0.1), "heldout": _s(0.12), "real_canary": _s(0.12)},
         {"heldout": (0.2, 10), "real_canary": (0.0, 10)}, "format drift, heldout"),
    ]
    for tuned, drift, failing in cases:
        out = judge(BASE, tuned, roles, Thresholds(domain_min_reduction=0.75), drift)
        line = verdict_line(out)
        assert not out["decision"] and line.startswith("VERDICT: FAIL") and failing in line, line


def test_a_missing_set_or_drift_is_not_measured_never_yes():
    tuned = {"domain_test": _s(0.1), "heldout": _s(0.12)}
    out = judge({k: BASE[k] for k in tuned}, tuned, assign_roles(tuned), Thresholds(), {"heldout": (0.0, 10)})
    assert not out["decision"] and any("real canary" in n for n in out["not_measured"])
    assert verdict_line(out).startswith("VERDICT: NOT MEASURED")
    # The drift itself unmeasured (no transcripts): not measured either.
    out = judge(BASE, dict(BASE), assign_roles(BASE), Thresholds(), {"heldout": (None, 0), "real_canary": (0.0, 3)})
    assert not out["decision"] and out["not_measured"] == ["format drift, heldout (share of utterances)"]
    # No domain set at all: the domain criterion is not measured (train without --eval-test).
    out = judge({"heldout": BASE["heldout"]}, {"heldout": BASE["heldout"]}, {"heldout": "heldout"}, Thresholds(),
                {"heldout": (0.0, 5)})
    assert not out["decision"] and "domain WER relative reduction" in out["not_measured"]


def test_format_drift_counts_casing_and_punctuation_changes_only_between_non_empty_transcripts():
    assert style("He was not an ill-disposed young man,") == (True, True)
    assert style("he was naught an old spurs young man") == (False, False)
    base = {"a": {"hyp": "Ten of clubs."}, "b": {"hyp": "Seven of clubs."}, "c": {"hyp": ""}, "d": {"hyp": "Hi."}}
    tuned = {"a": {"hyp": "ten of close"}, "b": {"hyp": "Seven of clubs."}, "c": {"hyp": "junk"}, "d": {"hyp": "Hey."}}
    assert format_drift(base, tuned) == (1 / 3, 3)  # a drifted; c (empty base) is content, not style
    assert format_drift({}, tuned) == (None, 0)
