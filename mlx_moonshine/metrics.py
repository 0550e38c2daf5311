"""Text normalisation and WER/CER.

Every run scores with the same `TextNormalizer` and records `normalizer.to_dict()` next to its
numbers, so two WERs are only compared when they were normalised the same way. The default
matches the baseline tool (shared/tools/eval_moonshine_wer.py) exactly.

Reported WER/CER are corpus-level: total errors / total reference words (or characters), not the
mean of per-sample rates, so long utterances weigh more, as in jiwer and most ASR papers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_NON_WORD = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class TextNormalizer:
    """Normalise a transcript before scoring.

    The default, in order: lowercase; delete '-' and "'" (so "o'clock" -> "oclock",
    "two-seven" -> "twoseven"); every other non-word character becomes a space; whitespace collapses.

    Attributes:
        lowercase: Lowercase the text.
        remove_hyphens_apostrophes: Delete '-' and "'" (joining the parts) before punctuation removal.
        remove_punctuation: Replace characters that are neither word characters nor whitespace by spaces.
        collapse_whitespace: Collapse runs of whitespace to one space and strip the ends.
    """

    lowercase: bool = True
    remove_hyphens_apostrophes: bool = True
    remove_punctuation: bool = True
    collapse_whitespace: bool = True

    def __call__(self, text: str) -> str:
        if self.lowercase:
            text = text.lower()
        if self.remove_hyphens_apostrophes:
            text = text.replace("-", "").replace("'", "")
        if self.remove_punctuation:
            text = _NON_WORD.sub(" ", text)
        if self.collapse_whitespace:
            text = _SPACES.sub(" ", text).strip()
        return text

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextNormalizer":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


DEFAULT_NORMALIZER = TextNormalizer()


def normalize_text(text: str, normalizer: TextNormalizer | None = None) -> str:
    """Normalise `text` with `normalizer` (default: the baseline tool's normalisation)."""
    return (normalizer or DEFAULT_NORMALIZER)(text)


def score(ref: str, hyp: str, normalizer: TextNormalizer | None = None) -> dict:
    """Score one hypothesis against its reference after normalising both.

    An empty (after normalisation) reference has no words to get wrong: every hypothesis word
    counts as an insertion, and the per-sample rate is 0.0 if the hypothesis is empty too, else
    1.0. Corpus scores (`corpus_scores`) just add the insertions to the error total, so empty
    references still cost something there. An empty hypothesis is all deletions.

    Returns:
        dict with ref, hyp (normalised), wer, cer, substitutions, deletions, insertions, hits,
        ref_words, char_errors, ref_chars.
    """
    import jiwer

    norm = normalizer or DEFAULT_NORMALIZER
    ref_n, hyp_n = norm(ref), norm(hyp)
    hyp_words = hyp_n.split()
    if not ref_n:
        # jiwer refuses empty references; count everything as insertions ourselves.
        return dict(ref=ref_n, hyp=hyp_n, wer=float(bool(hyp_words)), cer=float(bool(hyp_n)),
                    substitutions=0, deletions=0, insertions=len(hyp_words), hits=0, ref_words=0,
                    char_errors=len(hyp_n), ref_chars=0)
    w = jiwer.process_words(ref_n, hyp_n)
    c = jiwer.process_characters(ref_n, hyp_n)
    char_errors = c.substitutions + c.deletions + c.insertions
    ref_chars = c.substitutions + c.deletions + c.hits  # includes spaces, as jiwer.cer does
    return dict(
        ref=ref_n, hyp=hyp_n, wer=float(w.wer), cer=char_errors / ref_chars,
        substitutions=w.substitutions, deletions=w.deletions, insertions=w.insertions,
        hits=w.hits, ref_words=w.substitutions + w.deletions + w.hits,
        char_errors=char_errors, ref_chars=ref_chars,
    )


def corpus_scores(samples: list[dict]) -> dict:
    """Corpus-level WER/CER from per-sample `score` dicts: sum of errors / sum of reference units.

    Returns:
        dict with n, wer, cer and the summed counts.
    """
    keys = ("substitutions", "deletions", "insertions", "hits", "ref_words", "char_errors", "ref_chars")
    tot = {k: int(sum(s[k] for s in samples)) for k in keys}
    word_errors = tot["substitutions"] + tot["deletions"] + tot["insertions"]

    def rate(errors: int, total: int) -> float:
        # No reference at all: 0.0 when nothing was hypothesised, else 1.0 (as in `score`).
        return errors / total if total else float(errors > 0)

    return dict(n=len(samples), wer=rate(word_errors, tot["ref_words"]),
                cer=rate(tot["char_errors"], tot["ref_chars"]), word_errors=word_errors, **tot)
