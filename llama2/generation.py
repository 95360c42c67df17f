"""Batched sampling with a KV cache (gpt-fast style: prefill, decode_one_token, sample).

Prompts of different lengths share one batch by left-padding: every row writes the same cache
columns, `KVCache.key_mask` hides the padding, and each row's rotary positions start at 0 at its
first real token — so a row generates exactly what it would generate alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llama2.compiled_decode import CompiledDecode
from llama2.model import KVCache, Transformer
from llama2.packed_decode import PackedModel


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.6  # Llama 2 chat default; 0 means greedy
    top_p: float = 0.9  # nucleus sampling (1.0 = off)
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # token ids that end a sequence (EOS, end-of-turn)
    stop_strings: tuple[str, ...] = ()  # texts that end a sequence (cut from the output)
    ignore_eos: bool = False  # keep generating through stop ids (benchmarking)
    # Completion.logprobs under the sampling distribution (logits / temperature) instead of the
    # model's own (temperature 1): what PPO's ratio needs for its θ_old (llama2.rollout).
    logprobs_at_temperature: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @classmethod
    def for_chat(cls, fmt, **kw) -> SamplingParams:
        """Sampling that stops where the chat format `fmt` (llama2.chat_format.ChatFormat) ends a turn."""
        return cls(stop_ids=tuple(sorted(fmt.stop_ids)), stop_strings=tuple(fmt.stop_strings), **kw)


@dataclass
class Completion:
    tokens: list[int]  # generated ids (without the stop token)
    text: str
    logprobs: list[float]  # log-probability of each generated token (temperature 1 unless asked otherwise)
    finish_reason: str  # "stop" (stop id or string) or "length"
    prompt_tokens: int
    stop_token: int | None = None
    stop_logprob: float | None = None  # log-probability of stop_token, likewise


@dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of unnormalised probabilities (B, V) -> (B, 1), by inverting the CDF.

    One uniform number per row and a binary search in the running sum, instead of torch.multinomial,
    which on CPU draws a random number for every vocabulary entry, at every decoding step. u is in
    (0, 1], so a token of probability 0 is never drawn: the search returns the first index whose
    running sum reaches u·total, and a zero entry never raises the sum.
    """
    cdf = probs.cumsum(dim=-1)
    u = 1.0 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token per row from logits (B, V) -> (B,)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest set of tokens whose mass reaches top_p (the top token always stays).
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) > params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        return order.gather(-1, draw(sorted_p, generator)).squeeze(-1)
    return draw(probs, generator).squeeze(-1)


class Decoder:
    """Generates continuations of token-id prompts with one model (and optionally its tokenizer).

    `packed`: decode with a PackedModel copy (default: on CPU, where it is faster). `compile`:
    decode single rows with the compiled step of `llama2.compiled_decode` (fp32 or quantized CPU
    models; compiled on first use, then cached by inductor on disk); batches and prefill stay
    eager. Call `refresh()` after the model's weights change (e.g. between RLHF iterations).
    """

    def __init__(self, model: Transformer, tokenizer=None, packed: bool | None = None, compile: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.packed = self.device.type == "cpu" if packed is None else packed
        self.compile = compile
        self.refresh()

    def refresh(self) -> None:
        self._forward = PackedModel(self.model) if self.packed else self.model
        self._compiled = CompiledDecode(self.model) if self.compile else None

    PREFILL_GROUP = 16  # rows per prefill group when grouping saves padding (see `prefill`)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the left-padded prompts through the model; return last logits (B, V) and next positions (B,).

        Consecutive groups of PREFILL_GROUP rows are each padded only to their own longest prompt
        when that saves at least a fifth of the padded positions (callers sort prompts by length,
        so that the prompts of a group are close in length). Each group
        fills its rows of the cache right-aligned at the batch's longest prompt, so decoding sees
        one left-padded batch either way, and every row gets what it would get alone (tested).
        """
        B, L = len(prompts), max(map(len, prompts))
        G = self.PREFILL_GROUP
        groups = [(s, min(s + G, B)) for s in range(0, B, G)]
        grouped = sum((e - s) * max(map(len, prompts[s:e])) for s, e in groups)
        if grouped > 0.8 * B * L:
            groups = [(0, B)]
        logits = []
        for s, e in groups:
            Lg = max(map(len, prompts[s:e]))
            logits.append(self._prefill_rows(prompts[s:e], cache if (s, e) == (0, B) else cache.rows(s, e, L - Lg)))
        cache.length = L
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        return torch.cat(logits), positions

    def _prefill_rows(self, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
        B, L = len(prompts), max(map(len, prompts))
        pad = self.tokenizer.pad_id if self.tokenizer is not None and self.tokenizer.pad_id is not None else 0
        tokens = torch.full((B, L), pad, dtype=torch.long)
        valid = torch.zeros(B, L, dtype=torch.bool)
        for i, p in enumerate(prompts):
            tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, L - len(p):] = True
        tokens, valid = tokens.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # 0 at each row's first real token
        start = cache.length  # the columns [start, start + L) of the batch's cache
        cache.key_mask[:, start:start + L] = valid
        return self._forward(tokens, positions=positions, cache=cache, last_only=True)[:, -1]

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step for every row: token (B,), position (B,) -> logits (B, V)."""
        cache.key_mask[:, cache.length] = True
        if self._compiled is not None and token.shape[0] == 1:
            return self._compiled(token, position, cache)
        return self._forward(token[:, None], positions=position[:, None], cache=cache, last_only=True)[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_token: Callable[[int, int], None] | None = None,
        stats: GenerationStats | None = None,
    ) -> list[Completion]:
        """Sample continuations for a batch of prompts. `on_token(row, token_id)` streams tokens."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        max_ctx = self.model.args.max_seq_len
        longest = max(map(len, prompts))
        if longest >= max_ctx:
            raise ValueError(f"prompt of {longest} tokens does not fit the context of {max_ctx}")
        max_new = min(params.max_new_tokens, max_ctx - longest)
        B = len(prompts)
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        cache = KVCache(self.model.args, B, longest + max_new, self.dtype, self.device)
        stop_ids = set() if params.ignore_eos else set(params.stop_ids)

        t0 = time.perf_counter()
        logits, position = self.prefill(prompts, cache)
        t1 = time.perf_counter()

        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_logprobs: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        stop_token: list[int | None] = [None] * B
        stop_logprob: list[float | None] = [None] * B
        lp_temperature = params.temperature if params.logprobs_at_temperature and not params.greedy else 1.0
        rows = torch.arange(B)  # original row index of each live row in the (shrinking) batch
        decoded = 0
        for step in range(max_new):
            token = sample(logits.float(), params, generator)  # (b,)
            scaled = logits.float() if lp_temperature == 1.0 else logits.float() / lp_temperature
            logp = torch.log_softmax(scaled, dim=-1).gather(-1, token[:, None]).squeeze(-1)
            done = []
            for j, (r, t, lp) in enumerate(zip(rows.tolist(), token.tolist(), logp.tolist())):
                if t in stop_ids:
                    finish[r], stop_token[r], stop_logprob[r] = "stop", t, lp
                    done.append(j)
                    continue
                out_tokens[r].append(t)
                out_logprobs[r].append(lp)
                decoded += 1
                if on_token is not None:
                    on_token(r, t)
                if params.stop_strings and self._hits_stop_string(out_tokens[r], params.stop_strings):
                    finish[r] = "stop"
                    done.append(j)
            if len(done) == len(rows) or step == max_new - 1:
                break
            if done:  # drop finished rows from the batch so they cost nothing more
                keep = torch.tensor([j for j in range(len(rows)) if j not in set(done)], device=self.device)
                cache.select(keep)
                rows, token, position = rows[keep.cpu()], token[keep], position[keep]
            logits = self.decode_one_token(token, position, cache)
            position = position + 1
        t2 = time.perf_counter()
        if stats is not None:
            stats.prefill_tokens += sum(map(len, prompts))
            stats.prefill_seconds += t1 - t0
            stats.decode_tokens += decoded
            stats.decode_seconds += t2 - t1

        completions = []
        for r in range(B):
            text = self.tokenizer.decode(out_tokens[r]) if self.tokenizer is not None else ""
            if params.stop_strings:
                cut = min((i for i in (text.find(s) for s in params.stop_strings) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
            completions.append(Completion(out_tokens[r], text, out_logprobs[r], finish[r] or "length",
                                          len(prompts[r]), stop_token[r], stop_logprob[r]))
        return completions

    def _hits_stop_string(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        # Decode only a short tail: a stop string spans at most a few dozen tokens.
        tail = self.tokenizer.decode(tokens[-32:]) if self.tokenizer is not None else ""
        return any(s in tail for s in stops)
