"""SentencePiece tokenizer as the reference runner uses it: encode without BOS/EOS (SPEC 6)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


class TokenizerError(ValueError):
    """A tokenizer file that is missing or not a SentencePiece model."""


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer model not found (pass --tokenizer PATH)")
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(token_id)
