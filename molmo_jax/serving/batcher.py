"""Continuous batching: one engine thread owns the model and decodes every request in flight.

    engine = Engine(predictor, EngineConfig(max_batch=8, context=2048))
    engine.start()
    job = Job(example, max_tokens=64, on_event=callback)   # example: Predictor.prepare(...)
    engine.submit(job)            # QueueFull when --max-queue requests already wait
    ...                           # callback("delta", text) per chunk, then ("done", Result) or ("error", str)
    engine.close()

The KV cache has `max_batch` rows (slots) of `context` slots each, in one fixed compiled shape. A
waiting request is prefilled alone (`generate.prefill`, its prompt padded to a length bucket) and
put into a free row (`generate.insert_row`); then all rows decode together, `chunk` steps per
compiled call (`generate.decode_steps`). Requests join and leave at chunk boundaries: a row whose
request finished (stop token, stop string, max_tokens, cancelled) is free for the next one at once.
All rows write at one shared cache index; `generate.shift_cache` moves the rows back towards slot
0 when the index reaches the end, and up when a longer prompt needs room below it.
Greedy rows give exactly `Predictor.predict`'s tokens; sampled rows draw from one key per chunk
shared by the batch, so a seed does not reproduce a sampled answer.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from molmo_jax.inference.generate import (Generator, pad_prompt, decode_steps, insert_row, prefill, prompt_bucket,
                                          shift_cache)
from molmo_jax.inference.predictor import Predictor, collate

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_batch: rows decoded together; context: cache slots per row (prompt bucket + new tokens
    + one chunk must fit); chunk: decode steps per compiled call (requests join between chunks);
    max_queue: requests waiting for a row before submit refuses more."""
    max_batch: int = 8
    context: int = 2048
    chunk: int = 4
    max_queue: int = 64
    seed: int = 0

    def __post_init__(self):
        for name in ("max_batch", "context", "chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class QueueFull(Exception):
    """submit() with max_queue requests already waiting."""


class PromptTooLong(ValueError):
    """The prompt and max_tokens do not fit in the context; the message gives the numbers."""


@dataclasses.dataclass
class Result:
    text: str  # cut at stop strings, stripped (as Predictor's Answer)
    tokens: list[int]  # generated ids, stop token excluded
    finish_reason: str  # "stop" (stop token or string) or "length" (max_tokens)


@dataclasses.dataclass(eq=False)
class Job:
    """One request. on_event(kind, payload) is called from the engine thread: ("delta", str) with
    the next piece of stable text, then ("done", Result) or ("error", str). Set `cancelled` to
    drop it (a client gone, a deadline passed): its row is freed at the next chunk boundary."""
    example: dict
    max_tokens: int
    on_event: Callable[[str, Any], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    cancelled: bool = False
    tokens: list = dataclasses.field(default_factory=list)
    sent: str = ""  # the text already given out in deltas

    @property
    def prompt_tokens(self) -> int:
        return len(self.example["input_tokens"])


class Engine:
    def __init__(self, predictor: Predictor, config: EngineConfig = EngineConfig()):
        self.config = config
        self.graphdef, self.state = predictor.generator.graphdef, predictor.generator.state
        self.decode_text = predictor.tokenizer.decode
        self.eos_id = predictor.tokenizer.eos_id
        self.max_crops = predictor.crop.max_crops
        self.llm = predictor.model.llm
        b = config.max_batch
        self.cache = self.llm.init_cache(b, config.context)
        self.index = 0  # the cache's shared write slot, mirrored on the host
        self.rows: list[Optional[Job]] = [None] * b
        self.starts = np.zeros(b, np.int32)  # first slot of each row's tokens
        self.next_token = np.zeros(b, np.int32)  # the token each row feeds next
        self.positions = np.zeros(b, np.int32)  # its RoPE position
        self.key = jax.random.key(config.seed)
        self.waiting: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.counts = collections.Counter()  # finished requests by how: done, cancelled, failed
        self.thread = threading.Thread(target=self._run, name="molmo-engine", daemon=True)

    # ------------------------------------------------------------------ called from request threads
    def start(self) -> "Engine":
        self.thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def max_new_tokens(self, prompt_tokens: int) -> int:
        """The most tokens a prompt of this length leaves room for."""
        return self.config.context - prompt_bucket(prompt_tokens) - self.config.chunk

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        room = self.max_new_tokens(prompt_tokens)
        if room < 1:
            raise PromptTooLong(f"prompt is {prompt_tokens} tokens (padded to {prompt_bucket(prompt_tokens)}), "
                                f"longer than the context of {self.config.context} slots allows")
        if max_tokens > room:
            raise PromptTooLong(f"max_tokens={max_tokens} does not fit: a prompt of {prompt_tokens} tokens "
                                f"leaves room for {room} new tokens in the context of {self.config.context}")

    def submit(self, job: Job) -> None:
        self.check_fits(job.prompt_tokens, job.max_tokens)
        with self.wake:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.config.max_queue})")
            self.waiting.append(job)
            self.wake.notify()

    def load(self) -> dict:
        return {"running": sum(r is not None for r in self.rows), "waiting": len(self.waiting),
                "slots": self.config.max_batch, **{k: self.counts[k] for k in ("done", "cancelled", "failed")}}

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not any(self.rows):
                    self.wake.wait()
                if self.stopping:
                    break
                joining = []
                while self.waiting and len(joining) < self.rows.count(None):
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        joining.append(job)
                    else:
                        self.counts["cancelled"] += 1
            for job in joining:
                self._guard(self._admit, [job], job)
            if any(self.rows):
                self._guard(self._step, [j for j in self.rows if j is not None])
        for job in [j for j in self.rows if j is not None] + list(self.waiting):
            job.on_event("error", "the server is shutting down")

    def _guard(self, fn, jobs, *args) -> None:
        """Run one engine step; if it fails, its requests get a 500 and the engine goes on."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 (a model failure must not stop the engine thread)
            log.exception("engine step failed")
            for job in jobs:
                self._free(job)
                self.counts["failed"] += 1
                job.on_event("error", f"internal error while generating: {type(e).__name__}: {e}")
            if fn == self._step:  # the cache may be half donated: start from an empty one
                self.cache = self.llm.init_cache(self.config.max_batch, self.config.context)
                self.index = 0

    def _admit(self, job: Job) -> None:
        """Prefill one request alone and put it into a free row (or finish it on its first token)."""
        length = len(job.example["input_tokens"])
        prompt = pad_prompt(collate([job.example], self.max_crops), prompt_bucket(length))
        greedy = job.temperature == 0
        self.key, sub = jax.random.split(self.key)
        token, row_cache, position, _ = prefill(
            self.graphdef, self.state, prompt, sub, jnp.float32(max(job.temperature, 1e-6)),
            jnp.float32(job.top_p), cache_len=prompt["input_ids"].shape[1], greedy=greedy, top_k=0)
        if self._extend(job, np.asarray(token)):
            return
        bucket = prompt["input_ids"].shape[1]
        if self.index < bucket:  # room below the index for the prompt
            self._shift(bucket - self.index)
        row = self.rows.index(None)
        self.cache = insert_row(self.cache, row_cache, jnp.int32(row))
        self.rows[row] = job
        self.starts[row] = self.index - bucket
        self.next_token[row] = int(token[0])
        self.positions[row] = int(position[0])

    def _step(self) -> None:
        """Decode one chunk for every row; hand out the tokens; free finished rows."""
        chunk = self.config.chunk
        if self.index + chunk > self.config.context:
            self._shift(-min(int(self.starts[r]) for r, j in enumerate(self.rows) if j is not None))
        jobs = [j for j in self.rows if j is not None]
        temperature = np.array([j.temperature if j else 0.0 for j in self.rows], np.float32)
        top_p = np.array([j.top_p if j else 1.0 for j in self.rows], np.float32)
        self.key, sub = jax.random.split(self.key)
        tokens, _, self.cache, positions = decode_steps(
            self.graphdef, self.state, jnp.asarray(self.next_token), self.cache, jnp.asarray(self.positions), sub,
            jnp.asarray(temperature), jnp.asarray(top_p), steps=chunk, greedy=all(j.temperature == 0 for j in jobs),
            top_k=0, keep_logits=False)
        self.index += chunk
        tokens = np.asarray(tokens)
        self.positions = np.asarray(positions).copy()
        self.next_token = tokens[:, -1].copy()
        for row, job in enumerate(self.rows):
            if job is not None:
                self._extend(job, tokens[row])

    def _shift(self, shift: int) -> None:
        free = [j is None for j in self.rows]
        starts = np.where(free, self.index, self.starts).astype(np.int32)
        self.cache = shift_cache(self.cache, jnp.int32(shift), jnp.asarray(starts))
        self.index += shift
        self.starts = starts + shift

    def _extend(self, job: Job, new_tokens: np.ndarray) -> bool:
        """Add a row's new tokens to its job; emit the text that is final; True when it finished
        (its row, if it has one, is then free)."""
        if job.cancelled:
            self._free(job)
            self.counts["cancelled"] += 1
            return True
        finish = None
        for token in new_tokens.tolist():
            if token == self.eos_id:
                finish = "stop"
                break
            job.tokens.append(token)
            if len(job.tokens) >= job.max_tokens:
                finish = "length"
                break
        text = self.decode_text(job.tokens)
        if job.stop and any(s in text for s in job.stop):
            finish = "stop"
        if finish is None:
            self._emit_delta(job, stable_text(text, job.stop))
            return False
        self._free(job)
        final = Generator.cut_text(text, job.stop).strip()
        self._emit_delta(job, final)
        self.counts["done"] += 1
        job.on_event("done", Result(final, job.tokens, finish))
        return True

    @staticmethod
    def _emit_delta(job: Job, text: str) -> None:
        if text.startswith(job.sent) and len(text) > len(job.sent):
            job.on_event("delta", text[len(job.sent):])
            job.sent = text

    def _free(self, job: Job) -> None:
        if job in self.rows:
            self.rows[self.rows.index(job)] = None


def stable_text(text: str, stop: tuple[str, ...]) -> str:
    """The part of a growing answer that later tokens cannot change: without the leading
    whitespace (the answer is stripped), trailing whitespace, an unfinished UTF-8 character, and
    the tail that could still grow into a stop string."""
    text = text.lstrip().rstrip("\ufffd")
    if stop:
        text = text[:max(0, len(text) - (max(len(s) for s in stop) - 1))]
    return text.rstrip()
