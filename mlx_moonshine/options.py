"""`DecodingOptions`: the one set of decoding settings transcribe, eval and training share.

Frozen and validated once; written into every result file so that a baseline and a tuned model are only
ever compared under the same settings. No MLX import here: the CLI reads its defaults for `--help`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .errors import MoonshineError


class DecodingError(MoonshineError):
    """Invalid decoding options."""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class DecodingOptions:
    beam_size: int = 1  # 1 = greedy
    # Beam ranking: None ranks by mean log-probability per token; a float p uses the GNMT penalty
    # ((5 + length) / 6) ** p.
    length_penalty: Optional[float] = None
    max_tokens_per_second: float = 6.5  # token budget per second of audio (see module docstring)
    min_token_budget: int = 8  # budget floor for very short clips
    max_new_tokens: int = 224  # absolute cap, whatever the clip length
    no_repeat_ngram_size: int = 0  # 0 = off: ATC speech legitimately repeats digits ("two two zero")
    suppress_blank: bool = False  # forbid </s> as the first token (no empty transcripts)

    def __post_init__(self):
        problems = []
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            problems.append(f"beam_size must be an integer >= 1 (got {self.beam_size!r})")
        if not _finite(self.max_tokens_per_second) or self.max_tokens_per_second <= 0:
            problems.append(f"max_tokens_per_second must be a finite number > 0 (got {self.max_tokens_per_second!r})")
        if self.length_penalty is not None and not _finite(self.length_penalty):
            problems.append(f"length_penalty must be a finite number or unset (got {self.length_penalty!r})")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.min_token_budget < 1:
            problems.append(f"min_token_budget must be >= 1 (got {self.min_token_budget})")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size must be >= 0 (got {self.no_repeat_ngram_size})")
        if problems:
            raise DecodingError("invalid decoding options: " + "; ".join(problems))

    def token_budget(self, seconds: float) -> int:
        budget = max(self.min_token_budget, math.ceil(self.max_tokens_per_second * seconds))
        return min(budget, self.max_new_tokens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecodingOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DecodingError(f"unknown decoding options: {', '.join(unknown)}")
        return cls(**d)
