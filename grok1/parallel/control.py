"""Keeping every rank's engine in step when only rank 0 takes requests (`grok1 serve` under
torchrun).

Every rank builds the same engine over its shard of the model. Rank 0 runs the HTTP server and
drives its engine through `LeaderEngine`, which records each add_request / abort_request and,
before every step (and the warm-up), broadcasts the records since the last one over a CPU gloo
group; the other ranks sit in `follow`, applying what arrives to their own engine and stepping
with it, so every rank runs the same forwards and so issues the same collectives in the same
order. The scheduler is deterministic, and sampling uses per-request generators seeded alike on
every rank (rank 0 fixes a seed for requests that have none) on logits that are the same on every
rank (the vocabulary split's logits are gathered), so all ranks pick the same tokens. As a check,
each broadcast carries a digest of rank 0's outputs of the step before; a follower whose own
differ raises RankDivergenceError (its exit makes torchrun stop the job).

Rank 0 broadcasts only when it steps: while no request is in flight the followers block in the
receive, on a group whose timeout is long enough for an idle server.

The engine is any object with add_request(id, prompt_ids, params), abort_request(id), step() ->
outputs (each with request_id, new_token_ids, finished, finish_reason) and warmup(...): this
level does not import grok1.engine.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import random
from typing import Any

import torch.distributed as dist

log = logging.getLogger("grok1.parallel")

IDLE_TIMEOUT = datetime.timedelta(days=365)  # followers wait this long for the next request
LEADER = 0


class RankDivergenceError(RuntimeError):
    """A follower's engine produced other tokens than rank 0's in the same step."""


@dataclasses.dataclass
class Message:
    """What rank 0 sends before each engine call: the request events since the last message,
    what to do next ("step", "warmup" or "stop"), and rank 0's digest of its previous step."""
    events: list[tuple]
    then: str
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    check: Any = None


class ControlChannel:
    """Rank 0 -> every rank, over a gloo group of all ranks (CPU: apart from the model's NCCL
    collectives). Create it on every rank at the same point (it is a collective)."""

    def __init__(self, timeout: datetime.timedelta = IDLE_TIMEOUT):
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    @property
    def is_leader(self) -> bool:
        return self.rank == LEADER

    def send(self, msg: Message) -> None:
        if not self.is_leader:
            raise RuntimeError(f"ControlChannel.send on rank {self.rank}: only rank 0 sends")
        dist.broadcast_object_list([msg], src=LEADER, group=self.group)

    def recv(self) -> Message:
        box = [None]
        dist.broadcast_object_list(box, src=LEADER, group=self.group)
        return box[0]

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. KV-cache blocks that fit each GPU)."""
        box: list[Any] = [None] * self.world_size
        dist.all_gather_object(box, int(value), group=self.group)
        return min(box)


def digest(outputs: list) -> list[tuple]:
    """What must match across ranks after a step: each output's request, tokens and finish."""
    return [(o.request_id, tuple(o.new_token_ids), o.finished, o.finish_reason) for o in outputs]


class LeaderEngine:
    """Rank 0's engine, as the server sees it: the wrapped engine's API (other attributes pass
    through), with add_request / abort_request recorded for the followers and step / warmup
    preceded by a broadcast. Call it from one thread, like the engine; `stop()` at the end."""

    def __init__(self, engine: Any, channel: ControlChannel):
        self.engine = engine
        self.channel = channel
        self._events: list[tuple] = []
        self._last: Any = None  # digest of the last step, sent with the next message
        self._stopped = False

    def __getattr__(self, name: str) -> Any:  # stats(), has_unfinished_requests(), config ...
        return getattr(self.engine, name)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any) -> None:
        if not params.greedy and params.seed is None:  # a seed every rank shares
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        self.engine.add_request(request_id, prompt_token_ids, params)  # ValueError: not recorded
        self._events.append(("add", request_id, list(prompt_token_ids), params))

    def abort_request(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._events.append(("abort", request_id))

    def step(self) -> list:
        self._send("step")
        try:
            outputs = self.engine.step()
        except Exception:
            self._last = "step failed"
            raise
        self._last = digest(outputs)
        return outputs

    def warmup(self, *args, **kwargs) -> Any:
        self._send("warmup", args, kwargs)
        return self.engine.warmup(*args, **kwargs)

    def stop(self) -> None:
        """Release the followers (they return from `follow`); idempotent."""
        if not self._stopped:
            self._send("stop")
            self._stopped = True

    def _send(self, then: str, args: tuple = (), kwargs: dict | None = None) -> None:
        if self._stopped:
            raise RuntimeError(f"LeaderEngine.{then} after stop(): the followers are gone")
        msg = Message(self._events, then, args, kwargs or {}, self._last)
        self._events, self._last = [], None
        self.channel.send(msg)


def follow(engine: Any, channel: ControlChannel) -> int:
    """A follower's loop: apply rank 0's events to `engine` and step (or warm up) with it, until
    rank 0 says stop. Returns the number of steps run. RankDivergenceError if a step's outputs
    differ from rank 0's."""
    mine: Any = None
    steps = 0
    while True:
        msg = channel.recv()
        if msg.check != mine:
            raise RankDivergenceError(f"rank {channel.rank} step {steps}: outputs {mine!r} "
                                      f"differ from rank 0's {msg.check!r}")
        mine = None
        for event in msg.events:
            if event[0] == "add":
                _, request_id, prompt_ids, params = event
                engine.add_request(request_id, prompt_ids, params)
            elif event[0] == "abort":
                engine.abort_request(event[1])
            else:
                raise RuntimeError(f"rank {channel.rank}: unknown control event {event[0]!r}")
        if msg.then == "step":
            steps += 1
            try:
                mine = digest(engine.step())
            except Exception:  # rank 0 failed the same way; its aborts arrive next
                log.exception("rank %d: engine step %d failed", channel.rank, steps)
                mine = "step failed"
        elif msg.then == "warmup":
            engine.warmup(*msg.args, **msg.kwargs)
        elif msg.then == "stop":
            return steps
        else:
            raise RuntimeError(f"rank {channel.rank}: unknown control message {msg.then!r}")
