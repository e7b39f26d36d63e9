"""Train a small SentencePiece BPE model for experiments, laid out like Grok-1's (SPEC 6).

Same special ids (pad 0, bos 1, eos 2, unk 3), byte fallback, split digits, identity normalizer,
whitespace kept as written. Newline runs are user-defined pieces (as in Grok's vocabulary), so
text trained on paragraphs decodes back with its line breaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

NEWLINE_PIECES = ("\n", "\n\n")
MAX_SENTENCE_BYTES = 1 << 16


class TokenizerTrainError(ValueError):
    """Bad input to tokenizer training: no text, or a vocabulary too small for the fixed pieces."""


def _paragraphs(text_paths: Iterable[Path]) -> Iterator[str]:
    """Blank-line separated paragraphs, cut at line ends to stay under the trainer's limit."""
    for path in text_paths:
        for para in path.read_text(encoding="utf-8").split("\n\n"):
            while len(para.encode()) > MAX_SENTENCE_BYTES:
                cut = para.rfind("\n", 0, MAX_SENTENCE_BYTES // 4) + 1 or MAX_SENTENCE_BYTES // 4
                yield para[:cut]
                para = para[cut:]
            if para.strip():
                yield para


def train_tokenizer(text_paths: Iterable[str | Path], model_path: str | Path, *,
                    vocab_size: int = 2048, num_threads: int = 1) -> Path:
    """Train a BPE model on the text files and write it to model_path; returns the path.

    Deterministic for a given input and thread count. Raises TokenizerTrainError on a missing
    file or a vocabulary smaller than the 4 special + newline + 256 byte pieces allow.
    """
    import sentencepiece as spm

    paths = [Path(p) for p in text_paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TokenizerTrainError(f"{len(missing)} text file(s) not found: {', '.join(missing[:10])}")
    fixed = 4 + len(NEWLINE_PIECES) + 256
    if vocab_size <= fixed:
        raise TokenizerTrainError(f"vocab_size={vocab_size}: must exceed the {fixed} special, "
                                  f"newline and byte-fallback pieces")
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with open(model_path, "wb") as out:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_paragraphs(paths), model_writer=out, vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, split_digits=True, split_by_whitespace=True,
                pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
                user_defined_symbols=list(NEWLINE_PIECES), normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=True,
                allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
                character_coverage=1.0, max_sentence_length=MAX_SENTENCE_BYTES,
                input_sentence_size=0, shuffle_input_sentence=False,
                num_threads=num_threads, minloglevel=2)
        except RuntimeError as e:  # how sentencepiece reports bad input (no text, vocab too big)
            raise TokenizerTrainError(f"training {model_path} failed: {e}") from e
    return model_path
