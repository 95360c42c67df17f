"""Sampling chat answers for many prompts: what annotation batches, rejection sampling, PPO
rollouts and evaluation all need (Llama 2 §3.2).

`DialogSampler` renders each dialog with the model's chat format, sorts prompts by length so that
batches waste little padding, and returns K completions per dialog in the original order.
"""
from __future__ import annotations

import functools
from pathlib import Path

from llama2.chat_format import ChatFormat
from llama2.generation import Completion, Decoder, SamplingParams
from llama2.inference import load_for_inference
from llama2.train import derive_seed


class DialogSampler:
    def __init__(self, model, tokenizer, chat_style: str = "auto", batch_size: int = 32):
        self.decoder = Decoder(model, tokenizer)
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer, chat_style)
        self.batch_size = batch_size

    def refresh(self) -> None:
        """Call after the model's weights changed (the CPU fast path keeps a packed copy)."""
        self.decoder.refresh()

    def params(self, temperature: float, top_p: float, max_new_tokens: int, seed: int | None) -> SamplingParams:
        return SamplingParams.for_chat(self.format, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, seed=seed)

    def sample(self, dialogs: list[list[dict]], n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
               max_new_tokens: int = 64, seed: int | None = 0) -> list[list[Completion]]:
        """n completions for each dialog (ending with a user turn); result[i][j] is dialog i's j-th."""
        prompts = [self.format.prompt_ids(d) for d in dialogs]
        jobs = sorted(((len(p), i, j) for i, p in enumerate(prompts) for j in range(n)), reverse=True)
        out: list[list[Completion | None]] = [[None] * n for _ in dialogs]
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b:b + self.batch_size]
            # one seed per chunk: reproducible for the same inputs and order
            chunk_seed = None if seed is None else derive_seed(seed, b)
            params = self.params(temperature, top_p, max_new_tokens, chunk_seed)
            for (_, i, j), c in zip(chunk, self.decoder.generate([prompts[i] for _, i, _ in chunk], params)):
                out[i][j] = c
        return out  # type: ignore[return-value]


def sample_responses(model_path: str | Path, records: list[dict], temperature: float, seed: int,
                     max_new_tokens: int = 64, top_p: float = 1.0) -> list[str]:
    """One answer text per prompt record (`messages` ending with a user turn), from a checkpoint."""
    path = Path(model_path)
    sampler = _cached_sampler(str(path), path.stat().st_mtime_ns)
    outs = sampler.sample([r["messages"] for r in records], 1, temperature, top_p, max_new_tokens, seed)
    return [o[0].text.strip() for o in outs]


@functools.lru_cache(maxsize=2)
def _cached_sampler(model_path: str, stamp: int) -> DialogSampler:
    """Annotation samples each (policy, temperature) arm separately: load each policy once (a
    checkpoint rewritten at the same path has a new `stamp`, and is loaded again)."""
    model, tok = load_for_inference(model_path)
    return DialogSampler(model, tok)
