"""`grok1 serve`: load a model, start the engine and the OpenAI-compatible server under uvicorn.

    grok1 serve                                   # the embedded default model, 127.0.0.1:8000
    torchrun --nproc-per-node 4 -m grok1 serve --checkpoint /data/grok-1 --tp 4 --moe tp
    grok1 serve --checkpoint /data/grok-1 --host 0.0.0.0 --port 8000 --api-key $KEY \\
        --max-batch-size 64 --device cuda
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "grok1-default", "prompt": "ROMEO:", "max_tokens": 32}'

`python -m grok1.server.cli_serve [options]` is the same as `grok1 serve [options]`.
Under torchrun (`--tp N`), every rank loads its shard and builds the same engine; rank 0 alone
serves HTTP and drives the others' engines step by step (grok1.parallel.control), so they run the
same forwards and collectives; Ctrl-C/SIGTERM on rank 0 (or torchrun) stops every rank cleanly.
`serve_in_thread` runs an app on a loopback port in a background thread (tests, benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MODEL_NAME = "grok1-default"
FATAL_LINGER_S = 1.0  # /health reports a broken engine this long before the process exits

log = logging.getLogger("grok1.server")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The options of `grok1 serve` (model, engine, HTTP, ranks)."""
    from grok1.parallel.options import add_parallel_args

    p.add_argument("--checkpoint", type=Path, default=None,
                   help="release checkpoint (a folder holding ckpt-0/) or a grok1 folder; "
                        "default: the embedded default model (grok1/assets/default)")
    p.add_argument("--config", type=Path, default=None, help="config JSON (reference field names)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="the checkpoint's tokenizer file (default: tokenizer.model, or Grok-2's "
                        "tokenizer.tok.json, in or beside the checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dummy-layers", type=int, default=None, metavar="N",
                   help="serve random full-width Grok-1 weights with N layers instead of a "
                        "checkpoint (load tests on a GPU without the release files; needs "
                        "--tokenizer)")
    p.add_argument("--model-name", default=None,
                   help=f"the `model` clients must send (default: {DEFAULT_MODEL_NAME} for the "
                        "embedded model, else the checkpoint folder's name)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve the PEFT LoRA adapter in folder PATH as model NAME (repeatable; "
                        "a request's `model` picks it, as vLLM's --lora-modules)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GROK1_API_KEY if "
                        "set, else no key)")
    p.add_argument("--max-batch-size", type=int, default=64, help="engine requests per batch")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit in tokens, prompt + generated (default: the engine's)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV-cache blocks (default: the engine's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--max-queue", type=int, default=256,
                   help="engine requests waiting beyond the batch before new ones get 503")
    p.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after Ctrl-C/SIGTERM; then they "
                        "are cancelled (streams end with an error event and [DONE])")
    p.add_argument("--write-timeout", type=float, default=30.0,
                   help="seconds a client may take nothing of its stream before it is aborted")
    p.add_argument("--max-buffered-outputs", type=int, default=1024,
                   help="engine outputs a stream may have waiting for a slow client before it "
                        "is aborted")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_parallel_args(p)  # --tp/--moe/--unembed: under torchrun, rank 0 serves the others' shards


def _check_dummy_args(tokenizer: Path | None, checkpoint: Path | None) -> None:
    if tokenizer is None or checkpoint is not None:
        raise SystemExit("error: --dummy-layers needs --tokenizer and no --checkpoint")


def _model_dir_and_name(checkpoint: Path | None) -> tuple[Path, str]:
    """The folder to load and the name it is served under (the embedded model's by default)."""
    from grok1.assets import model_dir_or_default

    name = DEFAULT_MODEL_NAME if checkpoint is None else Path(checkpoint).resolve().name
    return model_dir_or_default(checkpoint), name


def load_served_model(args: argparse.Namespace, mesh=None, device: str | None = None):
    """(model, tokenizer, served model name, where it came from, chat template name) for
    `grok1 serve`'s options, through grok1.load or grok1.random_weights: the checkpoint folder,
    random full-width weights (--dummy-layers), or the embedded default model; with a mesh
    (under torchrun) this rank's shard with its collectives, else the whole model on `device`.
    The tokenizer's kind and the chat template are the checkpoint's family
    (grok1.loading.model_family)."""
    from grok1.config import GrokConfig
    from grok1.loading import load, load_tokenizer, model_family, random_weights
    from grok1.tokenizer import Tokenizer

    split = {"mesh": mesh, "moe": args.moe, "unembed": args.unembed,
             "device": None if mesh is not None else device}
    if args.dummy_layers is not None:
        _check_dummy_args(args.tokenizer, args.checkpoint)
        config = GrokConfig.preset("grok-1").replace(num_layers=args.dummy_layers)
        model, tok = random_weights(config, **split), Tokenizer(args.tokenizer)
        name, source = f"grok-1-dummy-{args.dummy_layers}l", "random weights"
        chat_template = "transcript"
    else:
        model_dir, name = _model_dir_and_name(args.checkpoint)
        tok = load_tokenizer(model_dir, args.tokenizer)
        chat_template = model_family(model_dir).chat_template
        model = load(model_dir, config=args.config, progress=mesh is not None, **split)
        source = str(model_dir)
    tok.require_vocab(model.config.vocab_size)
    return model, tok, name, source, chat_template


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"max_batch_size": args.max_batch_size, "block_size": args.block_size}
    if args.num_blocks is not None:
        kwargs["num_blocks"] = args.num_blocks
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    return kwargs


def lora_modules_arg(pairs: list[str], base_name: str) -> list[tuple[str, Path]]:
    """--lora NAME=PATH values -> [(NAME, PATH)]; SystemExit naming a malformed or repeated
    one, or a NAME that is the base model's."""
    out: list[tuple[str, Path]] = []
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --lora {pair!r}: expected NAME=PATH")
        if name == base_name or name in (n for n, _ in out):
            raise SystemExit(f"error: --lora {pair!r}: the name {name!r} is served already")
        out.append((name, Path(path)))
    return out


def _create_app(args: argparse.Namespace, engine, tokenizer, name: str, source: str,
                device: str, chat_template: str, adapter_names: tuple[str, ...] = ()):
    from grok1.server.app import create_app

    api_key = args.api_key if args.api_key is not None else os.environ.get("GROK1_API_KEY")
    log.info("serving %s (%s) on %s: max_model_len %d, batch %d, %d KV blocks%s",
             args.model_name or name, source, device, engine.max_model_len, args.max_batch_size,
             engine.stats().kv_blocks_total, ", API key required" if api_key else "")
    return create_app(engine, tokenizer, args.model_name or name, api_key,
                      max_pending=args.max_batch_size + args.max_queue, max_n=args.max_n,
                      shutdown_grace_s=args.shutdown_timeout,
                      write_timeout_s=args.write_timeout,
                      max_buffered_outputs=args.max_buffered_outputs,
                      chat_template=chat_template, adapter_names=adapter_names)


def build_app(args: argparse.Namespace):
    """Load model and tokenizer as `args` say and return the FastAPI app."""
    import torch

    from grok1.engine.llm import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, name, source, chat_template = load_served_model(args, device=device)
    adapters = lora_modules_arg(args.lora, args.model_name or name)
    selection = None
    if adapters:
        from grok1.checkpoint.peft import load_adapters

        selection = load_adapters(model, [path for _, path in adapters])
        log.info("LoRA adapters: %s", ", ".join(f"{n} ({p})" for n, p in adapters))
    engine = Engine(model, adapters=selection, **_engine_kwargs(args))
    return _create_app(args, engine, tokenizer, name, source, device, chat_template,
                       tuple(n for n, _ in adapters))


def run_serve(args: argparse.Namespace) -> None:
    """`grok1 serve`: blocks until Ctrl-C/SIGTERM, then shuts down gracefully. Under torchrun
    (or --tp > 1) every rank serves its shard, rank 0 alone over HTTP (`run_serve_ranks`)."""
    from grok1.parallel.options import wants_parallel

    if wants_parallel(args):
        run_serve_ranks(args)
        return
    serve_until_stopped(build_app(args), args)


def uvicorn_server(app, shutdown_timeout_s: float, **config):
    """A uvicorn.Server for `app` (create_app's) whose shutdown gives in-flight requests
    shutdown_timeout_s in all: uvicorn's own drain waits for open connections before it runs
    the app's shutdown, so the bridge's grace period (finish, else a final error event and
    [DONE]) starts at the same moment instead of after it."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            grace = asyncio.ensure_future(app.state.bridge.shutdown(grace_s=shutdown_timeout_s))
            await super().shutdown(sockets)
            await grace

    # uvicorn cancels what is still running this long after the bridge's final events went out
    return Server(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout_s + 5,
                                 **config))


def serve_until_stopped(app, args: argparse.Namespace) -> None:
    """uvicorn.run(app), except that a broken engine (bridge.py) stops the server: /health
    answers 503 with the reason for FATAL_LINGER_S, then SystemExit(1), so a supervisor
    restarts the process instead of keeping one that answers every request 503."""
    import asyncio

    server = uvicorn_server(app, args.shutdown_timeout, host=args.host, port=args.port,
                            log_level=args.log_level)

    def stop_broken(reason: str) -> None:
        log.critical("the engine is broken (%s); stopping the server in %.0f s", reason,
                     FATAL_LINGER_S)
        asyncio.get_running_loop().call_later(FATAL_LINGER_S, setattr, server, "should_exit",
                                              True)

    app.state.bridge.on_fatal = stop_broken
    server.run()
    if app.state.bridge.dead_reason is not None:
        raise SystemExit(f"grok1 serve: exiting with status 1, {app.state.bridge.dead_reason}")


def run_serve_ranks(args: argparse.Namespace) -> None:
    """`torchrun --nproc-per-node N -m grok1 serve --tp N ...` on every rank: load this rank's
    shard, build the engine (KV blocks: the fewest that fit any rank), then rank 0 serves HTTP
    through a LeaderEngine while the others follow it step by step; when rank 0 stops (Ctrl-C,
    SIGTERM, or a failed start-up) it releases them and every rank leaves the process group."""
    import gc
    import signal

    from grok1.engine.llm import Engine, default_num_blocks
    from grok1.parallel.control import ControlChannel, LeaderEngine, follow
    from grok1.parallel.mesh import init_distributed, shutdown

    if args.lora:
        raise SystemExit("error: --lora serves on one process for now (the ranks' sharded "
                         "layers carry no adapters); leave out --tp and torchrun")
    mesh = init_distributed(args.tp, device=args.device)
    channel = ControlChannel()
    model, tokenizer, name, source, chat_template = load_served_model(args, mesh)
    kwargs = _engine_kwargs(args)
    if args.num_blocks is None:  # sized by each rank's free memory: every rank takes the least
        max_len = args.max_model_len or model.config.sequence_len
        kwargs["num_blocks"] = channel.agree_min(default_num_blocks(
            model, args.block_size, max_len, args.max_batch_size, mesh.device))
    engine = Engine(model, **kwargs)
    steps = None
    # torchrun passes Ctrl-C/SIGTERM to every rank: followers ignore it and wait for rank 0's
    # stop; rank 0's uvicorn takes it while serving and raises it again when done, which then
    # must not kill rank 0 before it has released the followers
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if mesh.is_main:
            leader = LeaderEngine(engine, channel)
            app = _create_app(args, leader, tokenizer, name, f"{source}, {mesh.world_size} "
                              f"ranks, moe {args.moe}", str(mesh.device), chat_template)
            try:
                serve_until_stopped(app, args)
            finally:
                leader.stop()  # the engine thread is done: uvicorn ran the lifespan's shutdown
        else:
            steps = follow(engine, channel)  # on an error here rank 0 is still serving: no
    finally:                                 # barrier, exit, and torchrun stops the job
        for s, handler in previous.items():
            signal.signal(s, handler)
        if mesh.is_main or steps is not None:  # everyone has been released: leave together
            engine.runner.free_graphs()  # graphs holding captured NCCL calls hang the teardown
            del engine
            gc.collect()
            shutdown()
            log.info("rank %d of %d left the process group%s", mesh.rank, mesh.world_size,
                     "" if steps is None else f" after following {steps} steps")


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    start_timeout_s: float = 600.0,
                    shutdown_timeout_s: float = 5.0) -> Iterator[str]:
    """Serve `app` (create_app's) with uvicorn in a background thread; yields the base URL;
    stops on exit (`uvicorn_server`'s shutdown). port 0 picks a free port. Start-up includes the
    engine's warm-up (minutes for a big model on a cold GPU); RuntimeError if it fails or takes
    longer than start_timeout_s."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]  # uvicorn closes the socket if start-up fails
    server = uvicorn_server(app, shutdown_timeout_s, log_level=log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="grok1 serve", description="OpenAI-compatible server")
    add_serve_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_serve(args)


if __name__ == "__main__":
    main()
