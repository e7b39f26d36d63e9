"""`grok1` command line: parse, call, print. Each subcommand's work lives in its layer."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="release checkpoint (a folder holding ckpt-0/) or a grok1 native folder; "
                        "default: the small embedded Shakespeare model")
    p.add_argument("--config", type=Path, default=None,
                   help="config JSON with the reference's field names (default: the checkpoint's "
                        "config.json, or the grok-1 preset for a release checkpoint)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="SentencePiece model (default: tokenizer.model in or beside the checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens regardless")
    p.add_argument("--engine", choices=["auto", "on", "off"], default="auto",
                   help="the fast engine (fused kernels, paged cache, CUDA graphs) or the plain "
                        "reference path; auto = the engine on one GPU, plain otherwise")


def load_model_and_tokenizer(args: argparse.Namespace):
    """(model, tokenizer, mesh): under torchrun (or --tp > 1) this rank's shard and its mesh,
    with args.seed agreed across ranks; else the whole model and mesh None."""
    from grok1.assets import model_dir_or_default
    from grok1.checkpoint import load
    from grok1.parallel.launch import agree_seed, load_for_args, wants_parallel
    from grok1.tokenizer import Tokenizer, find_tokenizer

    model_dir = model_dir_or_default(args.checkpoint)
    tokenizer = Tokenizer(find_tokenizer(args.tokenizer, model_dir))
    mesh = None
    if wants_parallel(args):
        model, mesh = load_for_args(args, model_dir)
        args.seed = agree_seed(args.seed, mesh)
    else:
        model = load(model_dir, config=args.config, device=_device(args.device))
    tokenizer.require_vocab(model.config.vocab_size)
    return model, tokenizer, mesh


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer, mesh = load_model_and_tokenizer(args)
    try:
        _generate_and_print(model, tokenizer, args, quiet=mesh is not None and not mesh.is_first)
    finally:
        if mesh is not None:
            from grok1.parallel.mesh import shutdown

            shutdown()


def _generate_and_print(model, tokenizer, args: argparse.Namespace, quiet: bool) -> None:
    import torch

    from grok1.generation import generate
    from grok1.sampling import SamplingParams

    out = (lambda text: None) if quiet else sys.stdout.write  # one rank prints
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    use_engine = args.engine == "on" or (args.engine == "auto" and quiet is False
                                         and model.embed.is_cuda and not hasattr(model, "local_config"))

    def run(on_token=None) -> list[list[int]]:
        if use_engine:
            from grok1.engine.llm import LLM

            outs = LLM(model).generate(prompts, params, on_token=on_token and
                                       (lambda _rid, token: on_token(0, token)))
            return [o.token_ids for o in outs]
        return [r.token_ids for r in generate(model, prompts, params, on_token=on_token)]

    if len(prompts) == 1:  # stream: print each new piece of text as its token arrives
        out(args.prompt[0])
        ids: list[int] = []
        printed = ""

        def on_token(_row: int, token: int) -> None:
            nonlocal printed
            ids.append(token)
            text = tokenizer.decode(ids)
            if not text.endswith("\ufffd"):  # hold back a partly decoded UTF-8 character
                out(text[len(printed):])
                sys.stdout.flush()
                printed = text

        run(on_token)
        out(tokenizer.decode(ids)[len(printed):] + "\n")
        return
    with torch.inference_mode():
        results = run()
    for prompt, token_ids in zip(args.prompt, results):
        out(f"--- {prompt!r}\n{prompt}{tokenizer.decode(token_ids)}\n")


def cmd_info(args: argparse.Namespace) -> None:
    from grok1.config import GrokConfig
    from grok1.info import format_info

    config = GrokConfig.from_json(args.config) if args.config else GrokConfig.preset(args.preset)
    print(format_info(config, gpu_gib=args.gpu_gib))


def build_parser() -> argparse.ArgumentParser:
    from grok1.parallel.launch import add_parallel_args

    parser = argparse.ArgumentParser(prog="grok1", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text (default: the embedded Shakespeare model)")
    p.add_argument("prompt", nargs="+", help="one or more prompts (several run as one batch)")
    _add_model_args(p)
    _add_sampling_args(p)
    add_parallel_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameter counts, weight and KV bytes, GPUs needed")
    p.add_argument("--config", type=Path, default=None, help="config JSON (reference field names)")
    p.add_argument("--preset", default="grok-1", help="a named config when --config is not given")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB")
    p.set_defaults(func=cmd_info)

    # the other subcommands live in their layers: (add arguments, run) pairs
    from grok1.engine.bench_cli import add_bench_args, run_bench
    from grok1.server.cli_serve import add_serve_args, run_serve
    from grok1.train.cli_train import COMMANDS as TRAIN_COMMANDS

    layered = {"serve": (add_serve_args, run_serve, "OpenAI-compatible HTTP server"),
               "bench": (add_bench_args, run_bench, "decode / prefill speed beside the roofline")}
    train_help = {"train": "train a Grok-architecture model (torchrun for several GPUs)",
                  "tokenize": "turn text files into memory-mapped token shards",
                  "train-tokenizer": "train a small SentencePiece BPE tokenizer",
                  "export": "export a training run to grok1's native format"}
    layered |= {name: (add, run, train_help[name]) for name, (add, run) in TRAIN_COMMANDS.items()}
    for name, (add, run, help_text) in layered.items():
        p = sub.add_parser(name, help=help_text)
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from grok1.checkpoint import CheckpointError
    from grok1.config import ConfigError
    from grok1.tokenizer import TokenizerError
    from grok1.train.checkpoints import CheckpointCorruptError
    from grok1.train.trainer import TrainingDiverged

    try:
        args.func(args)
    except (CheckpointError, ConfigError, TokenizerError, CheckpointCorruptError,
            TrainingDiverged, ValueError) as e:
        raise SystemExit(f"error: {type(e).__name__}: {e}") from None


if __name__ == "__main__":
    main()
