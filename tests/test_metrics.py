"""Text normalisation and WER/CER (mlx_moonshine/metrics.py)."""

from __future__ import annotations

import pytest

from mlx_moonshine.metrics import TextNormalizer, corpus_scores, normalize_text, score

# Outputs of norm() in ../shared/tools/eval_moonshine_wer.py, hard-coded so this runs without the shared folder.
BASELINE_NORM = [
    ("Delta 2-7-5, climb FL350!", "delta 275 climb fl350"),
    ("  It's  O'Clock...\tnow ", "its oclock now"),
    ("Café—résumé_x, 10.5%", "café résumé_x 10 5"),
    ("KLM1234, cleared ILS/DME rwy 27L.", "klm1234 cleared ils dme rwy 27l"),
]


@pytest.mark.parametrize("text,expected", BASELINE_NORM)
def test_default_normalisation_matches_baseline_tool(text, expected):
    assert normalize_text(text) == expected
    assert TextNormalizer()(text) == expected


def test_normalizer_options_and_dict_round_trip():
    n = TextNormalizer(lowercase=False, remove_punctuation=False)
    assert n("Hello, World") == "Hello, World"
    assert TextNormalizer.from_dict({**n.to_dict(), "future_option": 1}) == n


def test_word_and_char_counts_on_known_strings():
    s = score("the cat sat on the mat", "the cat sit on mat")
    # sat->sit (S), the second "the" deleted (D)
    assert (s["substitutions"], s["deletions"], s["insertions"], s["hits"]) == (1, 1, 0, 4)
    assert s["ref_words"] == 6 and s["wer"] == pytest.approx(2 / 6)
    i = score("cleared to land", "cleared to land runway")
    assert (i["insertions"], i["wer"]) == (1, pytest.approx(1 / 3))
    c = score("abcd", "abxd")
    assert c["char_errors"] == 1 and c["ref_chars"] == 4 and c["cer"] == pytest.approx(0.25)


def test_scoring_normalises_both_sides():
    s = score("Delta 2-7-5, climb!", "delta 275 climb")
    assert s["wer"] == 0.0 and s["cer"] == 0.0


def test_empty_hypothesis_is_all_deletions_and_empty_reference_all_insertions():
    s = score("one two three", "")
    assert (s["deletions"], s["wer"]) == (3, 1.0)
    e = score("...", "hello there")
    assert (e["ref_words"], e["insertions"], e["wer"]) == (0, 2, 1.0)
    assert score("", "")["wer"] == 0.0


def test_corpus_scores_are_total_errors_over_total_reference_words():
    per = [score("a b c d", "a b c d"), score("x y", "x z"), score("", "extra")]
    c = corpus_scores(per)
    # 1 substitution + 1 insertion over 6 reference words (not the mean of per-sample WERs).
    assert c["n"] == 3 and c["word_errors"] == 2 and c["ref_words"] == 6
    assert c["wer"] == pytest.approx(2 / 6)
    assert c["cer"] == pytest.approx((1 + 5) / (7 + 3))
