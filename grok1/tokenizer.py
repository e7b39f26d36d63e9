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

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()  # never added by encode (SPEC 6); named for clients

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokens that end a generation (unless ignore_eos): eos."""
        return (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(token_id)

    def require_vocab(self, vocab_size: int) -> None:
        """Refuse a model whose vocabulary differs from ours: prompt ids beyond the model's
        table, or generated ids without a piece, would fail mid-request."""
        if self.vocab_size != vocab_size:
            raise TokenizerError(f"tokenizer {self.path} has {self.vocab_size} pieces but the "
                                 f"model's vocab_size is {vocab_size}; wrong --tokenizer?")


def find_tokenizer(tokenizer: str | Path | None, model_dir: Path,
                   file_name: str = "tokenizer.model") -> Path:
    """The tokenizer the user named, else `file_name` in the checkpoint folder or beside it
    (the reference keeps ./tokenizer.model next to ./checkpoints; Grok-2 ships
    tokenizer.tok.json in its folder)."""
    if tokenizer is not None:
        return Path(tokenizer)
    for candidate in (model_dir / file_name, model_dir.parent / file_name):
        if candidate.is_file():
            return candidate
    raise TokenizerError(f"no {file_name} in {model_dir} or beside it; pass --tokenizer PATH")
