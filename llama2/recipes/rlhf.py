"""`llama2 rlhf <method>`: the RLHF stages of Llama 2 §3.2.3 behind one command.

    llama2 rlhf rejection-sampling --config configs/rlhf/rejection_sampling_tiny.yaml [key=value ...]
    llama2 rlhf best-of-n --policy CKPT --reward-models grader --prompts FILE --n 100 --out DIR
    llama2 rlhf ppo --config ...

Each method lives in its own module, imported only when asked for.
"""
from __future__ import annotations

import importlib
import sys

METHODS: dict[str, tuple[str, str]] = {
    "rejection-sampling": ("llama2.recipes.rejection_sampling:cli", "best-of-K answers, fine-tuned on like SFT"),
    "best-of-n": ("llama2.best_of_n:cli", "max/median reward among N samples per temperature (Figures 7, 8)"),
    "ppo": ("llama2.recipes.ppo:cli", "PPO on the safety-gated reward with a KL penalty"),
}


def _usage() -> str:
    width = max(map(len, METHODS))
    return "\n".join(["usage: llama2 rlhf <method> [options]", "", "methods:"]
                     + [f"  {name:<{width}}  {help_}" for name, (_, help_) in METHODS.items()])


def cli(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in METHODS:
        print(f"llama2 rlhf: unknown method {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = METHODS[name][0].split(":")
    try:
        target = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as e:
        if e.name != module:  # a missing dependency inside an existing module is a real error
            raise
        print(f"llama2 rlhf: {name} is not available in this build ({module} is missing)", file=sys.stderr)
        return 2
    return int(target(rest) or 0)
