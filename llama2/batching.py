"""Continuous batching: sequences join and leave one running decode batch (what `llama2 serve` runs).

`Decoder.generate` decodes a fixed batch from start to end. A server cannot wait for a batch to
fill or to finish: `BatchEngine` owns the model in one background thread and keeps a set of live
sequences in one left-padded KV cache (`llama2.model.KVCache`). At every step it

1. prefills the sequences that arrived since the last step (`Decoder.prefill`, into their own
   cache) and merges them into the batch's cache, right-aligned at the batch's current column —
   every row's rotary positions start at 0 at its own first token and `key_mask` hides the rest,
   so a row computes what it would compute alone (the same trick as `Decoder`'s left padding);
2. samples each row's next token with its own `SamplingParams` and its own generator
   (`llama2.generation.sample`), so a seeded request draws the same tokens whatever else runs;
3. drops the rows that finished (stop id, stop string, max tokens, cancelled) and runs one
   `Decoder.decode_one_token` step for the rest.

A single request runs exactly the `Decoder.generate` computation (same prefill, same per-step
forward, same sampling), so its greedy or seeded output is identical (tested). Columns that no
live row uses any more (left of the oldest live row) are dropped when the cache grows.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llama2.generation import Decoder, SamplingParams, sample
from llama2.model import KVCache, Transformer
from llama2.tokenizer import StreamDecoder

GROW = 64  # extra cache columns allocated when the batch's cache is full


@dataclass
class TokenEvent:
    """One generated token: the text that became final with it (may be empty) and its log-probs."""

    token: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, float]]  # (token id, log-prob), best first; empty unless asked


@dataclass
class FinishEvent:
    """The end of a sequence; `text` is the whole answer (stop string cut), `rest` what was not yet sent."""

    finish_reason: str  # "stop", "length" or "cancelled"
    text: str
    rest: str
    tokens: list[int]
    prompt_tokens: int
    first_token_s: float | None  # seconds from submission to the first token (None: no token)
    seconds: float


Event = TokenEvent | FinishEvent


@dataclass(eq=False)
class Sequence:
    """A request in the engine: its prompt, sampling and the state of its decoding."""

    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    top_logprobs: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already sent in TokenEvents
    max_new: int = 0
    generator: torch.Generator | None = None
    stream: StreamDecoder | None = None
    first_token_s: float | None = None
    cut: bool = False  # a stop string ended the text


class BatchEngine:
    """Runs `submit`ted prompts in one continuously batched decode loop on a background thread.

    `on_event` callbacks are called on the engine thread: a TokenEvent per generated token, then
    one FinishEvent. `cancel(seq_id)` stops a sequence at the next step (its FinishEvent says
    "cancelled"). `max_batch` bounds the rows decoded together; more sequences wait in the queue.
    """

    def __init__(self, model: Transformer, tokenizer, max_batch: int = 64, packed: bool | None = None,
                 compile: bool = False):
        self.decoder = Decoder(model, tokenizer, packed=packed, compile=compile)
        self.model, self.tokenizer = model, tokenizer
        self.args = model.args
        self.max_batch = max_batch
        self._queue: queue.Queue[Sequence] = queue.Queue()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._live: list[Sequence] = []  # rows of the cache, in order
        self._cache: KVCache | None = None
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of each live row
        self._positions: torch.Tensor | None = None  # (B,) rotary position of each row's next token
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.generated_tokens = 0

    # -- public -----------------------------------------------------------------------------------
    def start(self) -> BatchEngine:
        self._thread = threading.Thread(target=self._run, name="llama2-batch-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)  # type: ignore[arg-type]  # wakes the loop
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None],
               top_logprobs: int = 0) -> int:
        """Queue a prompt; returns the sequence id (for `cancel`). Raises ValueError if it cannot fit."""
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if len(prompt) >= self.args.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.args.max_seq_len}")
        seq = Sequence(next(self._ids), list(prompt), params, on_event, top_logprobs)
        seq.max_new = min(params.max_new_tokens, self.args.max_seq_len - len(prompt))
        if params.seed is not None and not params.greedy:
            seq.generator = torch.Generator(device=self.decoder.device).manual_seed(params.seed)
        if self.tokenizer is not None:
            seq.stream = StreamDecoder(self.tokenizer)
        self._queue.put(seq)
        return seq.id

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            self._cancelled.add(seq_id)

    @property
    def queued(self) -> int:
        """Sequences submitted but not yet in the running batch."""
        return self._queue.qsize()

    @property
    def active(self) -> int:
        return len(self._live)

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._live:
                first = self._queue.get()  # idle: sleep until a request arrives
                if first is None or self._stop.is_set():
                    return
                self._admit([first])
            else:
                self._admit([])
            if self._live:
                self.step()

    def _admit(self, new: list[Sequence]) -> None:
        room = self.max_batch - len(self._live) - len(new)
        while room > 0:
            try:
                seq = self._queue.get_nowait()
            except queue.Empty:
                break
            if seq is None:
                continue
            new.append(seq)
            room -= 1
        with self._lock:
            cancelled = [s for s in new if s.id in self._cancelled]
            self._cancelled.difference_update(s.id for s in cancelled)
        for s in cancelled:
            self._finish(s, "cancelled")
        new = [s for s in new if all(s is not c for c in cancelled)]
        if not new:
            return
        new.sort(key=len_prompt)  # prefill groups of similar lengths pad less (see Decoder.prefill)
        longest = max(len(s.prompt) for s in new)
        cache = KVCache(self.args, len(new), longest, self.decoder.dtype, self.decoder.device)
        logits, positions = self.decoder.prefill([s.prompt for s in new], cache)
        self._merge(new, cache, logits, positions)

    @torch.inference_mode()
    def _merge(self, new: list[Sequence], cache: KVCache, logits: torch.Tensor, positions: torch.Tensor) -> None:
        """Append prefilled rows to the batch, both caches right-aligned at the longer one's length."""
        if self._cache is None:
            self._cache, self._logits, self._positions, self._live = cache, logits, positions, list(new)
            return
        old = self._cache
        length = max(old.length, cache.length)
        width = length + GROW
        B = len(self._live) + len(new)
        merged = KVCache(self.args, B, width, self.decoder.dtype, self.decoder.device)
        b = len(self._live)
        for dst, parts in ((merged.k, (old.k, cache.k)), (merged.v, (old.v, cache.v))):
            for layer, (o, n) in enumerate(zip(*parts)):
                dst[layer][:b, :, length - old.length:length] = o[:, :, :old.length]
                dst[layer][b:, :, length - cache.length:length] = n[:, :, :cache.length]
        merged.key_mask[:b, length - old.length:length] = old.key_mask[:, :old.length]
        merged.key_mask[b:, length - cache.length:length] = cache.key_mask[:, :cache.length]
        merged.length = length
        self._cache = merged
        self._logits = torch.cat([self._logits, logits])
        self._positions = torch.cat([self._positions, positions])
        self._live = self._live + list(new)

    @torch.inference_mode()
    def _ensure_room(self) -> None:
        """Room for one more column: drop columns no live row uses, else allocate GROW more."""
        cache = self._cache
        if cache.length < cache.k[0].shape[2]:
            return
        used = cache.key_mask[:, :cache.length].any(dim=0).nonzero()
        first = int(used[0]) if len(used) else cache.length
        keep = cache.length - first
        grown = KVCache(self.args, len(self._live), keep + GROW, self.decoder.dtype, self.decoder.device)
        for dst, src in ((grown.k, cache.k), (grown.v, cache.v)):
            for layer, t in enumerate(src):
                dst[layer][:, :, :keep] = t[:, :, first:cache.length]
        grown.key_mask[:, :keep] = cache.key_mask[:, first:cache.length]
        grown.length = keep
        self._cache = grown

    @torch.inference_mode()
    def step(self) -> None:
        """Sample one token for every live row, retire the finished ones, run one decode step."""
        live, logits = self._live, self._logits.float()
        with self._lock:
            cancelled = self._cancelled & {s.id for s in live}
            self._cancelled -= cancelled
        logp_all = torch.log_softmax(logits, dim=-1)
        tokens = [self._sample_row(logits[i:i + 1], s) for i, s in enumerate(live)]
        keep: list[int] = []
        for i, (s, t) in enumerate(zip(live, tokens)):
            if s.id in cancelled:
                self._finish(s, "cancelled")
                continue
            reason = self._push(s, t, logp_all[i])
            if reason is not None:
                self._finish(s, reason)
            else:
                keep.append(i)
        self.steps += 1
        if not keep:
            self._live, self._cache, self._logits, self._positions = [], None, None, None
            return
        token = torch.tensor([tokens[i] for i in keep], device=self.decoder.device)
        position = self._positions
        if len(keep) < len(live):
            idx = torch.tensor(keep, device=self.decoder.device)
            self._cache.select(idx)
            position = position[idx]
            self._live = [live[i] for i in keep]
        self._ensure_room()
        self._logits = self.decoder.decode_one_token(token, position, self._cache)
        self._positions = position + 1

    def _sample_row(self, logits: torch.Tensor, s: Sequence) -> int:
        return int(sample(logits, s.params, s.generator)[0])

    def _push(self, s: Sequence, t: int, logp: torch.Tensor) -> str | None:
        """Add token t to s (sending its text); the finish reason if s ends here."""
        p = s.params
        if not p.ignore_eos and t in p.stop_ids:
            return "stop"
        if s.first_token_s is None:
            s.first_token_s = time.perf_counter() - s.submitted
        s.tokens.append(t)
        self.generated_tokens += 1
        if s.stream is not None:
            s.text += s.stream.push(t)
        top: list[tuple[int, float]] = []
        if s.top_logprobs:
            values, ids = logp.topk(s.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        reason = None
        if p.stop_strings:
            cut = first_stop(s.text, p.stop_strings)
            if cut >= 0:
                s.text, s.cut = s.text[:cut], True
                reason = "stop"
        if reason is None and len(s.tokens) >= s.max_new:
            reason = "length"
        # Send the text that can no longer turn out to start a stop string.
        end = len(s.text) if reason is not None else len(s.text) - held_back(s.text, p.stop_strings)
        piece = s.text[s.sent:end] if end > s.sent else ""
        s.sent = max(s.sent, end)
        s.on_event(TokenEvent(t, piece, float(logp[t]), top))
        return reason

    def _finish(self, s: Sequence, reason: str) -> None:
        with self._lock:
            self._cancelled.discard(s.id)
        text = s.text
        if s.stream is not None and not s.cut:  # the decoder may hold an incomplete character back
            text += s.stream.flush()
        if s.params.stop_strings:
            cut = first_stop(text, s.params.stop_strings)
            if cut >= 0:
                text = text[:cut]
        rest = text[s.sent:]
        s.on_event(FinishEvent(reason, text, rest, list(s.tokens), len(s.prompt), s.first_token_s,
                               time.perf_counter() - s.submitted))


def len_prompt(s: Sequence) -> int:
    return len(s.prompt)


def first_stop(text: str, stops) -> int:
    """Index of the earliest stop string in text, -1 if none."""
    return min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)


def held_back(text: str, stops) -> int:
    """How many characters at the end of text could be the start of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
