"""`grok1` command line: parse, call, print. Each subcommand's work lives in its layer.

Start-up stays light: the parser builds only the chosen subcommand's arguments, and each
subcommand imports its layer (torch, the server stack) when it runs, so `grok1 --help` and
`grok1 info` answer without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

DESCRIPTION = "xAI's Grok-1 in PyTorch: generate, serve, measure and train."
EXAMPLES = """\
examples:
  grok1 generate "ROMEO:"                     the embedded Shakespeare model, any CPU
  grok1 generate --device cuda --checkpoint checkpoints "The answer to life"
  torchrun --nproc-per-node 8 -m grok1 generate --checkpoint checkpoints --tp 8 "Hello"
  grok1 serve                                 OpenAI-compatible API on 127.0.0.1:8000
  grok1 info --gpu-gib 80                     Grok-1's size and the GPUs it needs
  grok1 COMMAND --help                        a command's options and their defaults
"""

# `grok1 generate` samples a readable passage by default; `grok1 serve` follows OpenAI's API
# defaults so OpenAI clients get what they expect (grok1/server/serving.py). Both helps say so.
GENERATE_MAX_TOKENS = 100
GENERATE_TEMPERATURE = 0.8
SERVER_DEFAULTS = ("a request without temperature or max_tokens gets OpenAI's defaults: "
                   "temperature 1.0, max_tokens 16 on /v1/completions and the rest of the context "
                   "on /v1/chat/completions")
GENERATE_EPILOG = textwrap.fill(
    f"sampling: temperature {GENERATE_TEMPERATURE}, {GENERATE_MAX_TOKENS} tokens unless given. "
    f"`grok1 serve` differs: {SERVER_DEFAULTS}. The same --seed gives the same text on both "
    "only with the same temperature, top-p, top-k and max tokens.", 79) + """

examples:
  grok1 generate "ROMEO:"                                  the embedded model
  grok1 generate --temperature 0 --max-tokens 40 "JULIET:"  greedy
  grok1 generate --seed 0 "ROMEO:" "JULIET:"                two prompts as one batch
  grok1 generate --device cuda --checkpoint checkpoints "The answer to life"
"""
SERVE_EPILOG = textwrap.fill(
    f"sampling: {SERVER_DEFAULTS}. `grok1 generate` defaults to temperature "
    f"{GENERATE_TEMPERATURE} and {GENERATE_MAX_TOKENS} tokens.", 79) + """

examples:
  grok1 serve                                       the embedded model as grok1-default
  grok1 serve --device cuda --checkpoint checkpoints --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "grok1-default", "prompt": "ROMEO:", "max_tokens": 32}'
"""


class UsageError(Exception):
    """A wrong argument: `main` prints it as one line and exits with status 2, as argparse does."""


def check_device(name: str) -> None:
    """UsageError unless torch can place tensors on device `name` (cpu, cuda, cuda:N)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        build = ("a CPU-only build" if torch.version.cuda is None
                 else f"built for CUDA {torch.version.cuda}, but it finds no GPU")
        raise UsageError(f"--device {name}: CUDA is not available (torch {torch.__version__} is "
                         f"{build}); use --device cpu, or run on a GPU machine with torch's CUDA "
                         "build")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to "
                         f"cuda:{count - 1}")


def check_model_paths(args: argparse.Namespace) -> None:
    """UsageError naming the first of --checkpoint (a folder), --config, --tokenizer (files) that
    does not exist, before any loading starts."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and not checkpoint.is_dir():
        raise UsageError(f"--checkpoint {checkpoint}: no such folder; give the folder holding the "
                         "release's ckpt-0/ or a grok1 folder (config.json + model.safetensors), "
                         "or leave --checkpoint out for the embedded model")
    for option in ("config", "tokenizer"):
        path = getattr(args, option, None)
        if path is not None and not path.is_file():
            raise UsageError(f"--{option} {path}: no such file; check the path, or leave "
                             f"--{option} out for the default")


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
                   help="the checkpoint's tokenizer file (default: tokenizer.model, or Grok-2's "
                        "tokenizer.tok.json, in or beside the checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=GENERATE_MAX_TOKENS,
                   help="tokens to generate per prompt (fewer if EOS comes first)")
    p.add_argument("--temperature", type=float, default=GENERATE_TEMPERATURE, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="most likely tokens to keep; 0 = off")
    p.add_argument("--seed", type=int, default=None,
                   help="same seed, same text (default: a random one each run)")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens regardless")
    p.add_argument("--engine", choices=["auto", "on", "off"], default="auto",
                   help="the fast engine (fused kernels, paged cache, CUDA graphs) or the plain "
                        "reference path; auto = the engine on one GPU, plain otherwise")


def load_model_and_tokenizer(args: argparse.Namespace):
    """(model, tokenizer, mesh) through grok1.load: under torchrun (or --tp > 1) this rank's
    shard and its mesh, with args.seed agreed across ranks; else the whole model and mesh None."""
    from grok1.assets import model_dir_or_default
    from grok1.loading import load, load_tokenizer
    from grok1.parallel.launch import agree_seed
    from grok1.parallel.mesh import init_distributed
    from grok1.parallel.options import wants_parallel

    model_dir = model_dir_or_default(args.checkpoint)
    tokenizer = load_tokenizer(model_dir, args.tokenizer)  # the checkpoint family's kind
    mesh = init_distributed(args.tp, device=args.device) if wants_parallel(args) else None
    model = load(model_dir, config=args.config, device=None if mesh else _device(args.device),
                 mesh=mesh, moe=args.moe, unembed=args.unembed)
    if mesh is not None:
        args.seed = agree_seed(args.seed, mesh)
    tokenizer.require_vocab(model.config.vocab_size)
    return model, tokenizer, mesh


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer, mesh = load_model_and_tokenizer(args)
    try:
        _generate_and_print(model, tokenizer, args, sharded=mesh is not None,
                            quiet=mesh is not None and not mesh.is_main)
    finally:
        if mesh is not None:
            from grok1.parallel.mesh import shutdown

            shutdown()


def _generate_and_print(model, tokenizer, args: argparse.Namespace, sharded: bool,
                        quiet: bool) -> None:
    import torch

    from grok1.generation import generate
    from grok1.sampling import SamplingParams

    out = (lambda text: None) if quiet else sys.stdout.write  # one rank prints
    # the tokenizer's stop tokens (eos; Grok-2's <|separator|> too), unless --ignore-eos
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            ignore_eos=args.ignore_eos,
                            stop_token_ids=() if args.ignore_eos else tokenizer.stop_ids)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    use_engine = args.engine == "on" or (args.engine == "auto" and not sharded
                                         and model.embed.is_cuda)

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
    from grok1.info import format_info, info_config

    config = info_config(args.config or args.preset)
    print(format_info(config, gpu_gib=args.gpu_gib, weights=args.weights,
                      group_size=args.group_size))
    if args.lora_rank is not None:
        from grok1.info import format_lora_plan
        from grok1.train.cli_train import lora_targets

        print(format_lora_plan(config, args.lora_rank, lora_targets(args.lora_targets),
                               args.seq_len, args.micro_batch, args.gpu_gib))


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from grok1.parallel.options import add_parallel_args

    p.add_argument("prompt", nargs="+", help="one or more prompts (several run as one batch)")
    _add_model_args(p)
    _add_sampling_args(p)
    add_parallel_args(p)


def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="config JSON (reference field names, or Grok-2's config.json)")
    p.add_argument("--preset", default="grok-1",
                   help="a named config when --config is not given (grok-1, grok-2, tiny, debug)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB")
    p.add_argument("--weights", choices=("int8", "int4", "fp8", "bf16"), default=None,
                   help="the fewest GPUs for this weight format only (default: each)")
    p.add_argument("--group-size", type=int, default=128, help="int4: inputs per scale group")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="also print the memory plan of `grok1 finetune` at this LoRA rank")
    p.add_argument("--lora-targets", default="attention", help="as grok1 finetune's: "
                   "attn.wq ... moe.w_down, or attention, experts, all")
    p.add_argument("--seq-len", type=int, default=4096, help="LoRA plan: tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="LoRA plan: sequences per step")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path,
                   help="the release (folder of ckpt-0/), a grok1 folder, or a Grok-2 folder")
    p.add_argument("dst", type=Path, help="the folder to write (resumes a killed conversion)")
    p.add_argument("--weights", choices=("int8", "int4", "fp8", "bf16"), default="int8",
                   help="format of the attention and expert matrices")
    p.add_argument("--group-size", type=int, default=128,
                   help="int4: inputs per scale group")
    p.add_argument("--config", default=None,
                   help="preset or config JSON (default: the source's own, or grok-1; a Grok-2 "
                        "folder takes its own config.json)")


def cmd_convert(args: argparse.Namespace) -> None:
    from grok1.checkpoint.convert import convert

    out = convert(args.src, args.dst, None if args.weights == "bf16" else args.weights,
                  group_size=args.group_size, config=args.config)
    print(f"wrote {out}")


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str
    # "module:add_function:run_function", imported only when the command is chosen
    entry: str
    epilog: str | None = None
    checks_model_paths: bool = False  # --checkpoint/--config/--tokenizer are inputs to load

    def load(self) -> tuple[Callable, Callable]:
        module, add, run = self.entry.split(":")
        module = importlib.import_module(module)
        return getattr(module, add), getattr(module, run)


COMMANDS = {
    "generate": Command("generate text (default: the embedded Shakespeare model)",
                        "grok1.cli:add_generate_args:cmd_generate", GENERATE_EPILOG, True),
    "info": Command("parameter counts, weight and KV bytes, GPUs needed",
                    "grok1.cli:add_info_args:cmd_info", checks_model_paths=True),
    "serve": Command("OpenAI-compatible HTTP server (default: the embedded model)",
                     "grok1.server.cli_serve:add_serve_args:run_serve", SERVE_EPILOG, True),
    "convert": Command("stream a checkpoint into grok1's sharded format (int8, int4, fp8)",
                       "grok1.cli:add_convert_args:cmd_convert"),
    "train": Command("train a Grok-architecture model (torchrun for several GPUs)",
                     "grok1.train.cli_train:add_train_args:run_train"),
    "tokenize": Command("turn text files into memory-mapped token shards",
                        "grok1.train.cli_train:add_tokenize_args:run_tokenize"),
    "train-tokenizer": Command("train a small SentencePiece BPE tokenizer",
                               "grok1.train.cli_train:add_train_tokenizer_args:"
                               "run_train_tokenizer"),
    "export": Command("export a training run to grok1's native format",
                      "grok1.train.cli_train:add_export_args:run_export"),
    "finetune": Command("LoRA adapters over a frozen (int8) base on a JSONL dataset",
                        "grok1.train.cli_train:add_finetune_args:run_finetune"),
    "merge": Command("merge a LoRA adapter into a grok1 folder",
                     "grok1.train.cli_train:add_merge_args:run_merge"),
}


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand in argv: the first word that is not an option (grok1 itself takes only -h)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _help_with_default(action: argparse.Action) -> str | None:
    """The action's help, ending with its default unless it states one already (argparse's
    ArgumentDefaultsHelpFormatter skips options without help and repeats stated defaults)."""
    help_text = action.help
    meaningless = (None, False, argparse.SUPPRESS)
    if (not action.option_strings or any(action.default is d for d in meaningless)
            or "default" in (help_text or "")):
        return help_text
    return (f"{help_text} " if help_text else "") + "(default: %(default)s)"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The `grok1` parser; only the subcommand named in `argv` gets its arguments (the others'
    layers are not imported)."""
    raw = argparse.RawDescriptionHelpFormatter  # the epilogs' examples keep their lines
    parser = argparse.ArgumentParser(prog="grok1", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = chosen_command(argv)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.summary, description=command.summary,
                           epilog=command.epilog, formatter_class=raw)
        if name == chosen:
            add, run = command.load()
            add(p)
            for action in p._actions:  # argparse has no public way to reach an added argument
                action.help = _help_with_default(action)
            p.set_defaults(func=run)
    return parser


def _layer_errors() -> tuple[type[Exception], ...]:
    """The layers' exceptions that are the user's to fix (besides ValueError, which covers
    ConfigError, TokenizerError and SamplingParams' checks). Imported only once one is raised:
    it then comes from a layer that is loaded already."""
    from grok1.checkpoint import CheckpointError
    from grok1.train.checkpoints import CheckpointCorruptError
    from grok1.train.trainer import TrainingDiverged

    return CheckpointError, CheckpointCorruptError, TrainingDiverged


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if COMMANDS[args.command].checks_model_paths:
            check_model_paths(args)
        if getattr(args, "device", None):
            check_device(args.device)
    except UsageError as e:
        print(f"grok1 {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        args.func(args)
    except Exception as e:
        if not isinstance(e, ValueError) and not isinstance(e, _layer_errors()):
            raise
        raise SystemExit(f"error: {type(e).__name__}: {e}") from None


if __name__ == "__main__":
    main()
