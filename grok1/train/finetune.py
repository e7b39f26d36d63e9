"""`grok1 finetune`: LoRA adapters trained over a frozen base (int8 stays int8 with its scales,
QLoRA-style) on a JSONL dataset, by the same Trainer as `grok1 train`, with its atomic
checkpoints and resume; and `grok1 merge`, an adapter folded into a grok1 folder.

    grok1 finetune --base checkpoints --data chat.jsonl --out runs/ft --lora-rank 16
    grok1 merge --base checkpoints --adapter runs/ft/adapter --out merged

A run folder OUT holds data/ (the dataset tokenized once, made from the JSONL whose sha256 is
in data/source.json), lora.json (the adapter's shape, fixed for the run), checkpoints/ (the
adapters and their AdamW state only) and, at the end, adapter/ in PEFT's format (grok1.
checkpoint.peft). Running the same command again resumes from the newest complete checkpoint.

Each JSONL line is one example: {"text": "..."} or {"messages": [{"role": "user", "content":
"..."}, ...]}, the latter written as `grok1 serve`'s transcript (grok1.chat). Examples are
joined, each followed by eos, into one token stream; its last `val_fraction` is the held-out
split the trainer evaluates on. The loss counts every token of a text example and, of a chat,
the assistant's replies alone (and the eos after a final reply): the rest is a loss mask's 0s
(grok1.train.data), as the prompt a served request sends is not the model's to predict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from grok1.chat import CHAT_ROLES, transcript_spans
from grok1.checkpoint.native import save_native
from grok1.checkpoint.peft import fill_adapter, read_adapter, save_adapter
from grok1.config import ConfigError
from grok1.loading import load
from grok1.lora import LoraConfig, apply_lora, merge_lora
from grok1.tokenizer import Tokenizer, find_tokenizer
from grok1.train.data import DataError, load_meta, write_dataset
from grok1.train.train_config import TrainConfig
from grok1.train.trainer import Trainer, TrainerHook

DATA_DIR, SOURCE_FILE, LORA_FILE, ADAPTER_DIR = "data", "source.json", "lora.json", "adapter"


def read_examples(path: str | Path) -> Iterator[tuple[str, list[tuple[int, int]] | None]]:
    """(text, the character spans the loss counts: None for all) of each JSONL example (module
    docstring); DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: JSONL dataset not found")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            yield _example_text(example, where)


def _example_text(example: Any, where: str) -> tuple[str, list[tuple[int, int]] | None]:
    if isinstance(example, dict) and isinstance(example.get("text"), str):
        return example["text"], None
    messages = example.get("messages") if isinstance(example, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected {{\"text\": str}} or {{\"messages\": [{{\"role\", "
                        "\"content\"}, ...]}")
    pairs = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] needs a role ({', '.join(CHAT_ROLES)}) "
                            "and a string content")
        pairs.append((m["role"], m["content"]))
    text, spans = transcript_spans(pairs)
    # a reply's line break counts too: the model learns to end its turn where `grok1 serve`'s
    # stop strings ("\nUser:") cut it
    return text, [(start, min(end + 1, len(text))) for role, start, end in spans
                  if role == "assistant"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def counted_tokens(tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]] | None
                   ) -> tuple[list[int], list[int]]:
    """(ids of text + eos, 1 for each token the loss counts). A span's tokens are those after
    the encoding of the text before it, up to those of the text through its end (a token that
    straddles a boundary counts); the eos counts when the text ends with a counted span."""
    ids = tokenizer.encode(text)
    if spans is None:
        return ids + [tokenizer.eos_id], [1] * (len(ids) + 1)
    counted = [0] * (len(ids) + 1)
    for start, end in spans:
        first = _common_prefix(tokenizer.encode(text[:start]), ids)
        last = len(ids) if end == len(text) else _common_prefix(tokenizer.encode(text[:end]), ids)
        counted[first:last] = [1] * (last - first)
    counted[-1] = 1 if spans and spans[-1][1] == len(text) else 0
    return ids + [tokenizer.eos_id], counted


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_data(jsonl: str | Path, tokenizer: Tokenizer, data_dir: str | Path, *,
                 val_fraction: float = 0.1) -> dict[str, Any]:
    """Tokenize the JSONL into `data_dir` once; a resumed run reuses it. DataError if the folder
    was made from another file (its sha256 differs)."""
    jsonl, data_dir = Path(jsonl), Path(data_dir)
    if not jsonl.is_file():
        raise DataError(f"{jsonl}: JSONL dataset not found")
    source = {"file": str(jsonl), "sha256": _sha256(jsonl), "val_fraction": val_fraction}
    recorded = data_dir / SOURCE_FILE
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if (before["sha256"], before["val_fraction"]) != (source["sha256"], val_fraction):
            raise DataError(f"{data_dir} was made from {before['file']} (sha256 "
                            f"{before['sha256'][:12]}..., val_fraction {before['val_fraction']}); "
                            f"{jsonl} differs: use a new --out")
        return load_meta(data_dir)
    ids: list[int] = []
    counted: list[int] = []
    masked = False
    for text, spans in read_examples(jsonl):
        example_ids, example_counted = counted_tokens(tokenizer, text, spans)
        ids += example_ids
        counted += example_counted
        masked = masked or spans is not None
    document = (jsonl.name, ids, counted) if masked else (jsonl.name, ids)
    meta = write_dataset(data_dir, [document], tokenizer.vocab_size, val_fraction=val_fraction,
                         masked=masked)
    recorded.write_text(json.dumps(source, indent=1) + "\n")  # last: the folder is complete
    return meta


def _fix_lora_config(out_dir: Path, lora: LoraConfig) -> None:
    """Record the run's adapter shape; a resumed run must ask for the same one."""
    path = out_dir / LORA_FILE
    fields = dataclasses.asdict(lora)
    fields["targets"] = list(fields["targets"])
    if path.is_file():
        before = json.loads(path.read_text())
        if before != fields:
            raise ConfigError(f"{path}: this run trains {before}; asked for {fields}. Resume "
                              "with the same --lora-* options or use a new --out")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields, indent=1) + "\n")


def finetune(base: str | Path, jsonl: str | Path, cfg: TrainConfig, lora: LoraConfig, *,
             tokenizer: str | Path | None = None, val_fraction: float = 0.1,
             hooks: Sequence[TrainerHook] = ()) -> dict[str, Any]:
    """Train `lora` adapters over the model in `base` on the JSONL `jsonl` (module docstring);
    `cfg.out_dir` is the run folder and `cfg.data_dir` is ignored (OUT/data is used). Returns
    the trainer's final metrics with "adapter": the PEFT folder written."""
    base, out_dir = Path(base), Path(cfg.out_dir)
    _fix_lora_config(out_dir, lora)
    tok = Tokenizer(find_tokenizer(tokenizer, base))
    data_dir = out_dir / DATA_DIR
    prepare_data(jsonl, tok, data_dir, val_fraction=val_fraction)
    model = load(base, progress=False)
    tok.require_vocab(model.config.vocab_size)
    apply_lora(model, lora, seed=cfg.seed)
    cfg = dataclasses.replace(cfg, data_dir=str(data_dir), model=str(base))
    trainer = Trainer(cfg, hooks, model=model)
    metrics = trainer.train()
    adapter = save_adapter(trainer.core, lora, out_dir / ADAPTER_DIR,
                           base_model_name_or_path=str(base), overwrite=True)
    return {**metrics, "adapter": str(adapter)}


def merge(base: str | Path, adapter: str | Path, out_dir: str | Path, *,
          tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """The model in `base` with the PEFT adapter `adapter` merged (lora.merge_lora: dense bf16
    matrices), written as a grok1 folder with the base's tokenizer."""
    base = Path(base)
    model = load(base, progress=False)
    config, tensors = read_adapter(adapter, model.config)
    apply_lora(model, config)
    fill_adapter(model, tensors, config)
    return save_native(merge_lora(model), out_dir, find_tokenizer(tokenizer, base),
                       overwrite=overwrite)
