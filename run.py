"""What xai-org/grok-1's run.py does, on grok1: load ./checkpoints/ckpt-0 and ./tokenizer.model,
complete the reference's prompt with 100 tokens at temperature 0.01 (seed 42), print the result.

It runs on the GPU (or CPU) it finds; several GPUs: torchrun --nproc-per-node N -m grok1 generate.
"""

import logging

import torch

from grok1.checkpoint import load
from grok1.generation import generate
from grok1.sampling import SamplingParams
from grok1.tokenizer import Tokenizer

CKPT_PATH = "./checkpoints"
TOKENIZER_PATH = "./tokenizer.model"


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(CKPT_PATH, device=device)  # the grok-1 preset, as run.py's config
    tokenizer = Tokenizer(TOKENIZER_PATH)
    inp = "The answer to life the universe and everything is of course"
    # the reference never stops on EOS and always returns max_len tokens (SPEC 5)
    params = SamplingParams(max_tokens=100, temperature=0.01, top_p=1.0, seed=42, ignore_eos=True)
    result = generate(model, [tokenizer.encode(inp)], params)[0]
    print(f"Output for prompt: {inp}", tokenizer.decode(result.token_ids))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
