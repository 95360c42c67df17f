"""`llama2 <command>`: one entry point for every stage of the recipe.

Commands are imported lazily (a table of "module:function"), so `llama2 tokenize` does not pay for
importing the training stack. Each function takes the remaining argv and returns an exit code.
Errors the user can fix (bad file, bad config, bad dialog) are printed as one clear line, without
a stack trace; set LLAMA2_DEBUG=1 to see the trace.
"""
from __future__ import annotations

import importlib
import os
import sys

# command -> ("module:function", one-line help). Two-word commands ("tokenizer train") are
# dispatched by their first word; the module parses the rest.
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("llama2.chat:cli", "chat with a model in the terminal (streaming, multi-turn, /reset)"),
    "generate": ("llama2.chat:generate_cli", "complete one prompt and print it (or --json)"),
    "tokenize": ("llama2.tokenizer_cli:tokenize_cli", "print the token ids of a text or a chat dialog"),
    "tokenizer": ("llama2.tokenizer_cli:tokenizer_cli", "tokenizer tools: `llama2 tokenizer train`"),
    "convert": ("llama2.convert:convert_cli", "convert checkpoints between native, HF, Meta and GGUF"),
    "pretrain": ("llama2.recipes.pretrain:cli", "pretraining (§2): packed sequences, AdamW + cosine, FSDP"),
    "sft": ("llama2.recipes.sft:cli", "supervised fine-tuning (§3.1): answers-only loss, packed dialogs"),
    "reward": ("llama2.recipes.reward_model:cli", "reward models (§3.2.2): reward train | eval | score"),
    "rlhf": ("llama2.recipes.rlhf:cli", "RLHF: rejection-sampling, best-of-n, ppo"),
    "data": ("llama2.data_cli:data_cli", "data tools: pretokenize, info, validate"),
    "pipeline": ("llama2.recipes.pipeline:cli", "the whole recipe: world -> pretrain -> SFT -> RLHF V1..Vn -> eval"),
    "evaluate": ("llama2.recipes.evaluate:cli", "win rates, violation and false-refusal rates (§3.4, §4.4)"),
    "report": ("llama2.report:report_cli", "HTML report of a pipeline run with the paper's plots"),
    "annotate": ("llama2.world.annotators:annotate_cli", "simulated weekly preference batch (§3.2.1)"),
    "world": ("llama2.world.generate:world_cli", "the built-in world: llama2 world generate"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llama2 <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `llama2 <command> --help` for a command's options."]
    return "\n".join(lines)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    # OMP_WAIT_POLICY is chosen when the llama2 package is imported, before torch (llama2/__init__.py).
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llama2: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FloatingPointError, OSError) as e:
        if os.environ.get("LLAMA2_DEBUG"):
            raise
        print(f"llama2 {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
