"""Thin wrapper over a Hugging Face `tokenizer.json` (Moonshine's 32k BPE)."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError


class Tokenizer:
    """encode/decode plus the special ids the decoder needs."""

    def __init__(self, path: str | Path, bos_id: int = 1, eos_id: int = 2):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: tokenizer.json not found; copy it from the source checkpoint")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ModelError(f"{path}: not a valid tokenizer.json ({e})") from e
        self.path = path
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text -> token ids, without <s>/</s> (the decoder adds them where needed)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Token ids -> text, special tokens dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()
