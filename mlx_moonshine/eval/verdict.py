"""The one verdict rule: may a tuned model replace its base? Used by `compare` and by report.md alike.

Every evaluated set has a role, from its manifest name unless told otherwise:
  * canary  - real general speech (names containing "canary"; the built-in real-speech canary);
  * heldout - general speech the adapter must not forget (names containing "heldout");
  * domain  - everything else, pooled.
Criteria (thresholds are the user's, defaults in `Thresholds`):
  * domain: pooled WER relative reduction >= domain_min_reduction (0: must not get worse);
  * heldout and canary: each set's WER rises by at most *_max_rise absolute points;
  * format drift on heldout and canary: the share of utterances whose casing/punctuation differs from the
    base's transcript of the same audio is at most format_drift_max (the WER normaliser cannot see it).
A role with no set, or a drift without predictions, is "not measured", and then the decision is never yes:
an unmeasured criterion certifies nothing.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

ROLES = ("domain", "heldout", "canary")
ROLE_LABELS = {"domain": "domain", "heldout": "held-out (synthetic)", "canary": "real canary"}


@dataclass(frozen=True)
class Thresholds:
    """What "may replace the base" means; every field can be set from the CLI or YAML."""

    domain_min_reduction: float = 0.0  # relative reduction of the pooled domain WER (0.75: -75%); 0: not worse
    heldout_max_rise: float = 1.0  # absolute WER points
    canary_max_rise: float = 1.0  # absolute WER points
    format_drift_max: float = 0.05  # share of heldout/canary utterances whose casing/punctuation changed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Criterion:
    name: str
    role: str
    sets: list = field(default_factory=list)
    value: Optional[float] = None
    threshold: str = ""
    passed: Optional[bool] = None  # None: not measured
    detail: str = ""

    @property
    def status(self) -> str:
        return "NOT MEASURED" if self.passed is None else "PASS" if self.passed else "FAIL"

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.4g}"
        return f"{self.name}: {shown} ({self.detail}), needs {self.threshold}: {self.status}"

    def to_dict(self) -> dict:
        return dict(asdict(self), status=self.status)


def assign_roles(names, heldout: Optional[str] = None, canary: Optional[str] = None) -> dict:
    """{manifest name: role}; `heldout`/`canary` name the set of that role explicitly."""
    roles = {}
    for n in names:
        if n == canary or (canary is None and "canary" in n.lower()):
            roles[n] = "canary"
        elif n == heldout or (heldout is None and "heldout" in n.lower()):
            roles[n] = "heldout"
        else:
            roles[n] = "domain"
    return roles


_PUNCT = re.compile(r"[.,!?;:\"]")


def style(text: str) -> tuple:
    """(has an upper-case letter, has sentence punctuation): what the WER normaliser throws away."""
    return any(c.isupper() for c in text), bool(_PUNCT.search(text))


def format_drift(base_rows: dict, tuned_rows: dict) -> tuple[Optional[float], int]:
    """(share of utterances whose `style` differs between the two raw transcripts, utterances compared).

    Only ids both transcribed as non-empty count (an empty transcript is a content change, not a style one).
    """
    pairs = [(base_rows[i].get("hyp", ""), tuned_rows[i].get("hyp", "")) for i in base_rows if i in tuned_rows]
    pairs = [(a, b) for a, b in pairs if a.strip() and b.strip()]
    if not pairs:
        return None, 0
    return sum(style(a) != style(b) for a, b in pairs) / len(pairs), len(pairs)


def _pooled(summaries: list[dict]) -> Optional[float]:
    words = sum(s.get("ref_words", 0) for s in summaries)
    if not summaries or not words:
        return None
    return sum(s.get("word_errors", round(s["wer"] * s.get("ref_words", 0))) for s in summaries) / words


def judge(base: dict, tuned: dict, roles: dict, thresholds: Thresholds = Thresholds(),
          drift: Optional[dict] = None, required=ROLES) -> dict:
    """The verdict on `tuned` against `base`.

    Args:
        base, tuned: {manifest name: eval summary (wer, ref_words, word_errors, n)}.
        roles: {manifest name: role} (see `assign_roles`); sets not in both runs are ignored.
        thresholds: The user's thresholds.
        drift: {manifest name: (share or None, utterances compared)} for heldout/canary sets; None: not measured.
        required: Roles whose absence makes the decision "not measured" (never yes).

    Returns:
        dict(criteria=[Criterion], decision=bool, not_measured=[criterion names], sets={name: role}).
    """
    names = [n for n in roles if n in base and n in tuned]
    by_role = {r: [n for n in names if roles[n] == r] for r in ROLES}
    crit: list[Criterion] = []
    dom = by_role["domain"]
    if dom:
        wb, wt = _pooled([base[n] for n in dom]), _pooled([tuned[n] for n in dom])
        if wb is not None and wt is not None:
            rel = (wb - wt) / wb if wb else 0.0
            t = thresholds.domain_min_reduction
            crit.append(Criterion("domain WER relative reduction", "domain", dom, rel,
                                  f">= {t:.0%}" if t else ">= 0 (not worse)", rel >= t if t else wt <= wb,
                                  f"{wb:.4f} -> {wt:.4f}"))
    elif "domain" in required:
        crit.append(Criterion("domain WER relative reduction", "domain", threshold="a domain set",
                              detail="not measured: no domain test set evaluated (train --eval-test)"))
    for role, limit in (("heldout", thresholds.heldout_max_rise), ("canary", thresholds.canary_max_rise)):
        label = ROLE_LABELS[role]
        for n in by_role[role]:
            rise = 100 * (tuned[n]["wer"] - base[n]["wer"])
            crit.append(Criterion(f"{label} WER rise, {n} (abs. points)", role, [n], rise, f"<= {limit:.1f}",
                                  rise <= limit, f"{base[n]['wer']:.4f} -> {tuned[n]['wer']:.4f}"))
            share, count = (drift or {}).get(n, (None, 0))
            crit.append(Criterion(f"format drift, {n} (share of utterances)", role, [n], share,
                                  f"<= {thresholds.format_drift_max:.0%}",
                                  None if share is None else share <= thresholds.format_drift_max,
                                  f"{count} utterances compared" if share is not None else
                                  "not measured: no transcripts of both models"))
        if not by_role[role] and role in required:
            how = "--canary" if role == "canary" else "--heldout"
            crit.append(Criterion(f"{label} WER rise (abs. points)", role, threshold=f"<= {limit:.1f}",
                                  detail=f"not measured: no {label} set evaluated ({how})"))
    decision = bool(crit) and all(c.passed is True for c in crit)
    return dict(criteria=crit, decision=decision, not_measured=[c.name for c in crit if c.passed is None],
                sets={n: roles[n] for n in names})


def verdict_line(result: dict) -> str:
    """`VERDICT: PASS|FAIL|NOT MEASURED (...)`, naming every set used and every failing/unmeasured criterion."""
    crit = result["criteria"]
    failed = [c for c in crit if c.passed is False]
    missing = [c for c in crit if c.passed is None]
    sets = ", ".join(f"{n} ({ROLE_LABELS[r]})" for n, r in result["sets"].items()) or "none"
    if failed:
        head, why = "FAIL", "; ".join(f"{c.name} {c.value:.4g} (needs {c.threshold})" for c in failed)
    elif missing:
        head, why = "NOT MEASURED", "; ".join(c.name for c in missing)
    else:
        head, why = "PASS", "every criterion passes"
    if failed and missing:
        why += "; not measured: " + "; ".join(c.name for c in missing)
    return f"VERDICT: {head} ({why}; sets: {sets})"
