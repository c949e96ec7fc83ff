"""Continuous batching of chat generation: requests that arrive while others generate share their decode steps.

One generation thread owns the model. Between two decode steps it admits waiting requests (up to
`max_batch` rows): their prompts are prefilled together (left-padded), and their key/value caches are joined
to the running batch's, left-padded to a common width. Each decode step then feeds every row its last
token in one forward pass; a row leaves the batch when it reaches the end-of-answer token, its own
`max_tokens`, or is cancelled (a client gone, a deadline passed), and its slot is free at the next step.
Greedy rows take the arg-max (the answers equal one-at-a-time `model.generate` greedy answers); sampled rows
draw from their own temperature and top-p.

The join needs a cache made of plain `DynamicLayer`s (full attention: Llama, SmolLM2, Qwen2, GPT-2 ...). A
model whose cache holds other layers (a sliding window) batches whole requests instead: waiting requests
join only an empty batch, all at once.

`max_batch=1` is one-at-a-time serving. The queue is bounded (`max_queue` requests waiting or generating;
`QueueFull` beyond it, with a retry delay). Every answer goes back on the event loop of the request that
asked: `Ticket.next()` gives its text pieces as they are generated, and the answer's token count and finish
reason at the end (`Ticket.result`).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .batching import QueueFull

__all__ = ["GenerationResult", "GenerationScheduler", "Ticket"]


@dataclass
class GenerationResult:
    """A finished answer: its text (stripped, special tokens dropped), its generated tokens (the end-of-answer
    token not counted) and why it ended."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-answer token), "length" (max_tokens) or "cancelled"


class Ticket:
    """One request's answer as it is generated, read on the event loop that submitted it."""

    def __init__(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.prompt, self.max_tokens, self.temperature, self.top_p = prompt, max_tokens, temperature, top_p
        self.cancelled = threading.Event()
        self.result: GenerationResult | None = None
        self._loop = loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        # the generation thread's view of the row
        self.tokens: list[int] = []
        self.sent = ""  # the text handed out so far
        self.started = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating this answer: its row leaves the batch at the next step (no-op when finished)."""
        self.cancelled.set()

    async def next(self) -> str | None:
        """The next text piece; None once the answer is complete (`result` is then set). Raises the model's
        error."""
        kind, value = await self._events.get()
        if kind == "piece":
            return value
        if kind == "error":
            raise value
        self.result = value
        return None

    async def text(self) -> str:
        """The whole answer, once generated."""
        while await self.next() is not None:
            pass
        assert self.result is not None
        return self.result.text

    def _push(self, kind: str, value: Any) -> None:  # from the generation thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the loop closed: nobody is listening any more
            pass


@dataclass
class _Batch:
    """The rows generating now: their tickets, the shared key/value cache and its attention mask (left
    padding is 0), each row's real length (its next position) and the token it feeds next."""

    tickets: list[Ticket] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    next_tokens: torch.Tensor | None = None


class GenerationScheduler:
    """The generation thread and its bounded queue, for a causal LM and its tokenizer.

    `decode(ids) -> str` turns token ids into text (special tokens dropped); `on_step(rows)` is called on the
    generation thread with the rows of each forward pass (metrics)."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int | None, pad_token_id: int | None,
                 decode: Callable[[list[int]], str], max_batch: int = 16, max_queue: int = 128,
                 on_step: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model, self.decode, self.on_step = model.eval(), decode, on_step
        self.eos, self.pad = eos_token_id, pad_token_id if pad_token_id is not None else 0
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        takes = _forward_parameters(model)
        self._keep_one = "logits_to_keep" in takes  # the output layer on the last position only
        self._cache_name = "cache" if "cache" in takes else "past_key_values"  # transformers 5.24 renamed it
        self._pending: deque[Ticket] = deque()
        self._wake = threading.Condition()
        self._batch = _Batch()
        self._joins: bool | None = None  # whether the model's cache can be joined (known after one prefill)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_answer = 0.0  # of the answers so far (moving average): the Retry-After estimate
        self.waiting = 0  # requests admitted and not finished (queued or generating)

    # --- the event loop's side --------------------------------------------------------------------------
    def start(self) -> "GenerationScheduler":
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the generation thread (after the server drained its requests); answers not yet complete fail."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> Ticket:
        """Queue a prompt (token ids) for generation; QueueFull when `max_queue` requests wait or generate.
        Called on the event loop that reads the ticket."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        with self._wake:
            if self.waiting >= self.max_queue:
                rounds = math.ceil(self.waiting / self.max_batch)
                raise QueueFull(self.waiting, self.max_queue, max(1, math.ceil(rounds * self._seconds_per_answer)))
            ticket = Ticket(list(prompt), max(1, int(max_tokens)), float(temperature), float(top_p),
                            asyncio.get_running_loop())
            self.waiting += 1
            self._pending.append(ticket)
            self._wake.notify()
        return ticket

    # --- the generation thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self._batch.tickets:
                    self._wake.wait()
                if self._stopping:
                    break
                # a cache that cannot be joined takes new rows only when the batch is empty, all at once
                room = self.max_batch - len(self._batch.tickets) if self._joins or not self._batch.tickets else 0
                admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            admitted = [t for t in admitted if not self._finish_if_cancelled(t)]
            try:
                with torch.inference_mode():
                    if admitted:
                        self._prefill(admitted)
                    if self._batch.tickets:
                        self._decode_step()
            except Exception as exc:  # the model failed: every row in flight fails with it, the thread goes on
                for ticket in admitted + self._batch.tickets:
                    if ticket.result is None:
                        self._finish(ticket, error=exc)
                self._batch = _Batch()
        for ticket in list(self._pending) + self._batch.tickets:  # the server stopped before these ended
            self._finish(ticket, "cancelled", RuntimeError("the server stopped before the answer was complete"))
        self._pending.clear()
        self._batch = _Batch()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        if self.on_step is not None:
            self.on_step(ids.shape[0])
        extra = {"logits_to_keep": 1} if self._keep_one else {}
        extra[self._cache_name] = cache  # updated in place
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        return out.logits[:, -1, :].float(), cache

    def _prefill(self, tickets: list[Ticket]) -> None:
        """The new rows' prompts in one left-padded forward pass, their first tokens, their cache joined to
        the batch's."""
        width = max(len(t.prompt) for t in tickets)
        ids = torch.full((len(tickets), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(tickets), width), dtype=torch.long)
        for row, ticket in enumerate(tickets):
            ids[row, width - len(ticket.prompt):] = torch.tensor(ticket.prompt)
            mask[row, width - len(ticket.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        from transformers import DynamicCache

        logits, cache = self._forward(ids, mask, positions, DynamicCache())
        self._joins = _joinable(cache)
        new = _Batch(list(tickets), cache, mask, mask.sum(-1), self._choose(logits, tickets))
        first_new = len(self._batch.tickets)
        self._batch = _join(self._batch, new) if self._batch.tickets else new
        self._emit(first_new)

    def _decode_step(self) -> None:
        """One token for every row: the rows' last tokens in one forward pass."""
        batch = self._batch
        assert batch.mask is not None and batch.lengths is not None and batch.next_tokens is not None
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        logits, batch.cache = self._forward(batch.next_tokens[:, None], mask, batch.lengths[:, None], batch.cache)
        batch.mask, batch.lengths = mask, batch.lengths + 1
        batch.next_tokens = self._choose(logits, batch.tickets)
        self._emit()

    def _choose(self, logits: torch.Tensor, tickets: list[Ticket]) -> torch.Tensor:
        """Each row's next token: the arg-max at temperature 0, else a draw at its temperature and top-p."""
        chosen = logits.argmax(-1)
        for row, ticket in enumerate(tickets):
            if ticket.temperature > 0:
                chosen[row] = _sample(logits[row], ticket.temperature, ticket.top_p)
        return chosen

    def _emit(self, first: int = 0) -> None:
        """Hand each row from `first` on its new token's text; rows that ended (or were cancelled) leave the
        batch."""
        batch = self._batch
        assert batch.next_tokens is not None
        keep = list(range(first))
        for row, (ticket, token) in enumerate(zip(batch.tickets, batch.next_tokens.tolist())):
            if row < first:
                continue
            if self._finish_if_cancelled(ticket):
                continue
            if token == self.eos:
                self._finish(ticket, "stop")
                continue
            ticket.tokens.append(token)
            text = self.decode(ticket.tokens).lstrip()
            if text.startswith(ticket.sent) and len(text) > len(ticket.sent) and not text.endswith("\ufffd"):
                ticket._push("piece", text[len(ticket.sent):])  # whole characters only
                ticket.sent = text
            if len(ticket.tokens) >= ticket.max_tokens:
                self._finish(ticket, "length")
                continue
            keep.append(row)
        if len(keep) < len(batch.tickets):
            self._batch = _select(batch, keep)

    def _finish_if_cancelled(self, ticket: Ticket) -> bool:
        if ticket.cancelled.is_set():
            self._finish(ticket, "cancelled")
            return True
        return False

    def _finish(self, ticket: Ticket, reason: str = "stop", error: BaseException | None = None) -> None:
        if ticket.result is not None:
            return
        text = self.decode(ticket.tokens).strip() if ticket.tokens else ""
        ticket.result = GenerationResult(text, len(ticket.tokens), reason)
        if error is not None:
            ticket._push("error", error)
        else:
            if text.startswith(ticket.sent) and len(text) > len(ticket.sent):  # what was held back
                ticket._push("piece", text[len(ticket.sent):])
            ticket._push("end", ticket.result)
        seconds = time.perf_counter() - ticket.started
        with self._wake:
            self.waiting -= 1
            self._seconds_per_answer = 0.8 * self._seconds_per_answer + 0.2 * seconds


# --- the shared cache --------------------------------------------------------------------------------------

def _joinable(cache: Any) -> bool:
    """Whether rows of this cache can be padded and joined: every layer a plain full-attention DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _join(old: _Batch, new: _Batch) -> _Batch:
    """The two batches as one: caches and masks left-padded to the wider of the two, rows appended."""
    assert old.mask is not None and new.mask is not None
    width = max(old.mask.shape[1], new.mask.shape[1])

    def widen(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for a, b in zip(old.cache.layers, new.cache.layers):
        a.keys = torch.cat([widen(a.keys, 2), widen(b.keys, 2)], dim=0)
        a.values = torch.cat([widen(a.values, 2), widen(b.values, 2)], dim=0)
    return _Batch(old.tickets + new.tickets, old.cache, torch.cat([widen(old.mask, 1), widen(new.mask, 1)]),
                  torch.cat([old.lengths, new.lengths]), torch.cat([old.next_tokens, new.next_tokens]))


def _select(batch: _Batch, rows: list[int]) -> _Batch:
    """The batch with only `rows`, and without the leading columns that are padding in all of them (in a cache
    that can be joined)."""
    if not rows:
        return _Batch()
    assert batch.mask is not None and batch.lengths is not None and batch.next_tokens is not None
    index = torch.tensor(rows, device=batch.mask.device)
    mask = batch.mask[index]
    if not _joinable(batch.cache):
        batch.cache.batch_select_indices(index)
        return _Batch([batch.tickets[r] for r in rows], batch.cache, mask, batch.lengths[index],
                      batch.next_tokens[index])
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    for layer in batch.cache.layers:
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    return _Batch([batch.tickets[r] for r in rows], batch.cache, mask[:, start:], batch.lengths[index],
                  batch.next_tokens[index])


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One draw from softmax(logits / temperature), kept to the smallest set of tokens whose probabilities
    reach `top_p`."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the tokens after the set reached top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1)[0]


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    """The parameter names of the (base) model's forward: a peft model passes its keywords through."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()
