"""What xai-org/grok-1's run.py does, on grok1: load ./checkpoints/ckpt-0 and ./tokenizer.model,
complete the reference's prompt with 100 tokens at temperature 0.01 (seed 42), print the result.

It runs on the GPU (or CPU) it finds; several GPUs: torchrun --nproc-per-node N -m grok1 generate.
Run it from the folder that holds checkpoints/ and tokenizer.model, as the reference's.
"""

import logging
from pathlib import Path

import torch

from grok1.checkpoint import CheckpointError
from grok1.generation import generate
from grok1.loading import load
from grok1.sampling import SamplingParams
from grok1.tokenizer import Tokenizer, TokenizerError

CKPT_PATH = "./checkpoints"
TOKENIZER_PATH = "./tokenizer.model"
# where the release comes from (xai-org/grok-1's README, SPEC 7)
DOWNLOAD = ("huggingface-cli download xai-org/grok-1 --repo-type model --include 'ckpt-0/*' "
            "--local-dir checkpoints")
TOKENIZER_URL = "https://github.com/xai-org/grok-1/raw/main/tokenizer.model"


def missing_files() -> str | None:
    """One line naming what is missing and how to get it, or None when both files are here."""
    ckpt0 = Path(CKPT_PATH, "ckpt-0").resolve()
    if not ckpt0.is_dir():
        return (f"no release checkpoint at {ckpt0}: download it (318 GB, 770 files) with "
                f"`{DOWNLOAD}` (or the torrent in xai-org/grok-1's README), so that "
                f"{ckpt0}/tensor00000_000 ... tensor00769_000 exist; put {TOKENIZER_URL} in "
                f"{Path(TOKENIZER_PATH).resolve()}; then run `python run.py` here again")
    if not Path(TOKENIZER_PATH).is_file():
        return (f"no tokenizer at {Path(TOKENIZER_PATH).resolve()}: download {TOKENIZER_URL} "
                "there, then run `python run.py` here again")
    return None


def main() -> None:
    missing = missing_files()
    if missing:
        raise SystemExit(f"run.py: {missing}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = load(CKPT_PATH, device=device)  # the grok-1 preset, as run.py's config
        tokenizer = Tokenizer(TOKENIZER_PATH)
    except (CheckpointError, TokenizerError) as e:  # names the file and what is wrong with it
        raise SystemExit(f"run.py: {type(e).__name__}: {e}") from None
    inp = "The answer to life the universe and everything is of course"
    # the reference never stops on EOS and always returns max_len tokens (SPEC 5)
    params = SamplingParams(max_tokens=100, temperature=0.01, top_p=1.0, seed=42, ignore_eos=True)
    result = generate(model, [tokenizer.encode(inp)], params)[0]
    print(f"Output for prompt: {inp}", tokenizer.decode(result.token_ids))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
