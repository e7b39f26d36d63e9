"""A small synthetic Grok-2 tokenizer.tok.json in the release's format (SPEC 5), for tests."""

import itertools
import json
import string

# specials first, at the ids SGLang's comment implies (2 = eos), then every byte, then merges
SPECIALS = ["<|pad|>", "<|separator|>", "<|eos|>", "<|control1|>", "<|reserved_3|>", "<|custom|>"]
MERGES = [b"th", b"he", b"the", b" the", b"in", b"ing", b" a", b"an", b"and", b" and", b"er",
          b"Hu", b"Hum", b"Human", b"As", b"Ass", b"\n\n", b"  "]


def write_tok_json(path, *, with_vocab_size=True, n_vocab=None, **overrides):
    """The file at `path`: SPECIALS, the 256 bytes, MERGES, then (`n_vocab`: that many tokens
    in all, a model's vocab_size) two-letter merges up to it; `overrides` replace fields."""
    special = [{"bytes": list(t.encode()), "token": i} for i, t in enumerate(SPECIALS)]
    regular = [{"bytes": [b], "token": len(SPECIALS) + b} for b in range(256)]
    merges = list(MERGES)
    if n_vocab is not None:
        letters = string.ascii_letters.encode()
        extra = [bytes(pair) for pair in itertools.product(letters, repeat=2)]
        extra = [m for m in extra if m not in merges]
        merges += extra[:n_vocab - len(special) - len(regular) - len(merges)]
        assert len(special) + len(regular) + len(merges) == n_vocab, "n_vocab too large"
    regular += [{"bytes": list(m), "token": len(SPECIALS) + 256 + k} for k, m in enumerate(merges)]
    spec = {"regular_tokens": regular, "special_tokens": special, "word_split": "V1"}
    if with_vocab_size:
        spec["vocab_size"] = len(special) + len(regular)
    spec.update(overrides)
    path.write_text(json.dumps(spec))
    return path


def golden_release_folder(folder, golden):
    """`folder` holding the Grok-2 golden's release files (linked, not copied) and a
    tokenizer.tok.json of its 1024-token vocabulary: a release folder as xai-org/grok-2 ships."""
    from grok1.tokenizer_grok2 import TOKENIZER_FILE

    folder.mkdir(parents=True, exist_ok=True)
    for p in golden.glob("*"):
        if p.suffix in (".safetensors", ".json"):
            (folder / p.name).symlink_to(p)
    write_tok_json(folder / TOKENIZER_FILE, n_vocab=1024)
    return folder
