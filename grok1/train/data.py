"""Token shards on disk and the deterministic loader that reads them.

A dataset is a folder: `meta.json` (dtype, vocab size, tokenizer, shard list with token counts)
and flat little-endian `train_NNN.bin` / `val_NNN.bin` token files, read through np.memmap so a
corpus never has to fit in memory. `tokenize_files` writes one from text files.

A dataset may also hold a loss mask (`train_mask_NNN.bin`, one uint8 per token: 1 = a target
the loss counts, 0 = not, e.g. a chat prompt); the loader then sets the targets it excludes to
IGNORE, which `losses.cross_entropy` skips.

The loader cuts each split into windows of seq_len + 1 tokens (inputs plus the shifted targets),
shuffles the window order once per epoch with a generator seeded by (seed, epoch), and gives rank
r of W the r-th slice of every global batch. Its whole position is (epoch, batch index), saved in
every checkpoint, so a resumed run reads exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

META = "meta.json"
FORMAT = "grok1-tokens-v1"
IGNORE = -100  # a target the loss skips (torch's cross_entropy ignore_index)
MASK_DTYPE = np.dtype(np.uint8)


class DataError(ValueError):
    """A token dataset folder that is missing, inconsistent or too small for the request."""


# ---- writing --------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the bytes), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_files(text_paths: Iterable[str | Path], tokenizer_path: str | Path,
                   out_dir: str | Path, *, val_fraction: float = 0.1,
                   shard_tokens: int = 1 << 26) -> dict[str, Any]:
    """Encode text files into train/val token shards under out_dir; returns the meta dict.

    Each file is one document followed by the tokenizer's eos id. The last `val_fraction` of every
    document's tokens goes to the validation split, so both splits sample every document and no
    text is in both. Raises DataError on a missing file or an empty result.
    """
    import sentencepiece as spm  # only the writer needs it

    sp = spm.SentencePieceProcessor()
    sp.Load(str(tokenizer_path))
    vocab_size, eos = sp.GetPieceSize(), sp.eos_id()

    def documents() -> Iterator[tuple[str, list[int]]]:
        for path in map(Path, text_paths):
            if not path.is_file():
                raise DataError(f"{path}: text file not found")
            ids = sp.EncodeAsIds(path.read_text(encoding="utf-8"))
            yield path.name, (ids + [eos] if eos >= 0 else ids)

    return write_dataset(out_dir, documents(), vocab_size, val_fraction=val_fraction,
                         shard_tokens=shard_tokens, tokenizer=str(tokenizer_path))


def write_dataset(out_dir: str | Path, documents: Iterable[tuple], vocab_size: int, *,
                  val_fraction: float = 0.1, shard_tokens: int = 1 << 26,
                  tokenizer: str | None = None, masked: bool = False) -> dict[str, Any]:
    """Write (name, token ids) documents as a dataset folder; returns the meta dict. The last
    `val_fraction` of each document goes to the val split. `masked`: documents are (name, ids,
    loss mask: 1 where the token counts as a target), written as mask shards beside the tokens.
    Raises DataError on an empty result or a mask of another length than its tokens."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1)")
    dtype = token_dtype(vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: _ShardWriter(out_dir, split, dtype, shard_tokens) for split in ("train", "val")}
    if masked:  # shards of the same token counts as the tokens', so they line up
        writers.update({f"{split}_mask": _ShardWriter(out_dir, f"{split}_mask", MASK_DTYPE,
                                                      shard_tokens) for split in ("train", "val")})
    listed = []
    for name, ids, *mask in documents:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise DataError(f"{name}: token ids outside [0, {vocab_size})")
        n_val = int(len(ids) * val_fraction)
        parts = {"": ids}
        if masked:
            if len(mask) != 1 or len(mask[0]) != len(ids):
                raise DataError(f"{name}: a loss mask of {len(mask[0]) if mask else 0} flags "
                                f"for {len(ids)} tokens")
            parts["_mask"] = [1 if m else 0 for m in mask[0]]
        for suffix, values in parts.items():
            writers["train" + suffix].write(values[:len(ids) - n_val])
            writers["val" + suffix].write(values[len(ids) - n_val:])
        listed.append({"file": name, "tokens": len(ids)})
    meta = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size,
            "tokenizer": tokenizer, "val_fraction": val_fraction, "documents": listed,
            "shards": {split: w.close() for split, w in writers.items()}}
    if not meta["shards"]["train"]:
        raise DataError(f"{out_dir}: no training tokens written (empty input?)")
    (out_dir / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buffer: list[int] = []
        self.shards: list[dict[str, Any]] = []

    def write(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        while len(self.buffer) >= self.shard_tokens:
            self._flush(self.buffer[:self.shard_tokens])
            self.buffer = self.buffer[self.shard_tokens:]

    def _flush(self, ids: list[int]) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        np.asarray(ids, dtype=self.dtype).astype(self.dtype.newbyteorder("<")).tofile(
            self.out_dir / name)
        self.shards.append({"file": name, "tokens": len(ids)})

    def close(self) -> list[dict[str, Any]]:
        if self.buffer:
            self._flush(self.buffer)
            self.buffer = []
        return self.shards


# ---- reading --------------------------------------------------------------------------------

def load_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META
    if not path.is_file():
        raise DataError(f"{path}: not found; make the dataset with `grok1 tokenize`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def open_split(data_dir: str | Path, split: str) -> list[np.memmap]:
    """The split's shards as read-only memory maps, checked against the sizes in meta.json
    ("train_mask" / "val_mask": its loss mask's, uint8)."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    dtype = (MASK_DTYPE if split.endswith("_mask") else np.dtype(meta["dtype"])).newbyteorder("<")
    shards = []
    for entry in meta["shards"].get(split, []):
        path = data_dir / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in meta.json is missing")
        found = path.stat().st_size
        if found != entry["tokens"] * dtype.itemsize:
            raise DataError(f"{path}: {found} bytes, meta.json says {entry['tokens']} tokens "
                            f"({entry['tokens'] * dtype.itemsize} bytes); re-run `grok1 tokenize`")
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    return shards


class TokenLoader:
    """Deterministic batches (x, y) of int64 [batch_size, seq_len] for one rank; Stateful.

    Windows never straddle shards. Each epoch shifts the window grid by an offset in
    [0, seq_len) and shuffles the windows, both drawn from a generator seeded by (seed, epoch);
    `shuffle=False` reads windows in order from offset 0 (validation).
    """

    def __init__(self, data_dir: str | Path, split: str, *, batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size={batch_size}, seq_len={seq_len}: must be positive")
        self.shards = open_split(data_dir, split)
        self.masks = open_split(data_dir, f"{split}_mask") if \
            f"{split}_mask" in load_meta(data_dir)["shards"] else None
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epoch, self.index = 0, 0  # the position: batch `index` of epoch `epoch`
        self._windows = self._make_windows(0)
        self.batches_per_epoch = len(self._windows) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.data_dir} ({split}): {len(self._windows)} windows of "
                            f"{seq_len + 1} tokens, fewer than one global batch of "
                            f"{batch_size * world_size}; use a smaller batch or seq_len")

    def _make_windows(self, epoch: int) -> torch.Tensor:
        """[n, 2] (shard, start) pairs of this epoch, in reading order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offset = int(torch.randint(self.seq_len, (1,), generator=g)) if self.shuffle else 0
        pairs = []
        for s, shard in enumerate(self.shards):
            starts = torch.arange(offset, len(shard) - self.seq_len, self.seq_len)
            pairs.append(torch.stack([torch.full_like(starts, s), starts], dim=1))
        windows = torch.cat(pairs) if pairs else torch.empty(0, 2, dtype=torch.long)
        if self.shuffle:
            windows = windows[torch.randperm(len(windows), generator=g)]
        return windows

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._windows = self._make_windows(self.epoch)
        first = (self.index * self.world_size + self.rank) * self.batch_size
        windows = self._windows[first:first + self.batch_size].tolist()
        rows = [self.shards[int(s)][int(t):int(t) + self.seq_len + 1] for s, t in windows]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        self.index += 1
        targets = batch[:, 1:]
        if self.masks is not None:
            counted = np.stack([self.masks[int(s)][int(t) + 1:int(t) + self.seq_len + 1]
                                for s, t in windows])
            targets = targets.masked_fill(torch.from_numpy(counted == 0), IGNORE)
        return batch[:, :-1], targets

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "world_size", "batch_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise DataError(f"loader state has {key}={state[key]}, this run {getattr(self, key)}"
                                f"; resume with the same data settings or start a new run")
        self.epoch, self.index = state["epoch"], state["index"]
        self._windows = self._make_windows(self.epoch)
