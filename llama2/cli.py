"""`llama2 <command>`: one entry point for every stage of the recipe.

Commands are a table of "module:function" names, imported only when run: `llama2 tokenize` must
not pay for importing the training stack (torch alone is ~1 s of start-up). A command with
subcommands (`llama2 rlhf ppo`, `llama2 data validate`, `llama2 study reward-scaling`) is a nested
table, dispatched the same way. Each function takes the remaining argv and returns an exit code. Errors the user can fix (bad file,
bad config, bad dialog) are printed as one clear line, without a stack trace; set LLAMA2_DEBUG=1
to see the trace.
"""
from __future__ import annotations

import os
import sys

from llama2.config import load_object

# name -> ("module:function", one-line help) or (subcommand table, one-line help)
Table = dict[str, tuple["str | Table", str]]

RLHF: Table = {
    "rejection-sampling": ("llama2.recipes.rejection_sampling:cli", "best-of-K answers, fine-tuned on like SFT"),
    "best-of-n": ("llama2.recipes.best_of_n:cli", "max/median reward among N samples per temperature (Figures 7, 8)"),
    "ppo": ("llama2.recipes.ppo:cli", "PPO on the safety-gated reward with a KL penalty"),
    "gatt": ("llama2.recipes.gatt:cli", "Ghost Attention (§3.3): keep a system instruction over many turns"),
    "context-distill": ("llama2.recipes.context_distill:cli",
                        "safety context distillation (§4.2.4, Figure 16): safety-RM-gated preprompted answers"),
}
# `llama2 evaluate multi-turn ...`; `llama2 evaluate key=value ...` (no subcommand) stays the win-rate evaluation
EVALUATE: Table = {
    "multi-turn": ("llama2.recipes.multi_turn:cli", "does a system instruction hold turn after turn (§3.3, Figure 10)"),
    "diversity": ("llama2.recipes.diversity:cli", "Self-BLEU vs temperature, factual vs creative prompts (§5.1, Figure 21)"),
    "refusal-detector": ("llama2.recipes.evaluate:refusal_detector_cli",
                         "accuracy of the refusal detector (false-refusal judge) on labelled answers"),
}
DATA: Table = {
    "validate": ("llama2.formats:validate_cli", "check data files against their formats (pretrain/sft/prompts/preferences)"),
    "pretokenize": ("llama2.data_cli:pretokenize_cli", "tokenize a corpus into token shards + manifest"),
    "info": ("llama2.data_cli:info_cli", "summarise a pretokenized dataset"),
}
STUDY: Table = {
    "reward-scaling": ("llama2.recipes.reward_scaling:cli",
                       "reward-model accuracy vs preference pairs, per model size (Figure 6)"),
    "reward-scaling-run": ("llama2.pipeline:reward_scaling_cli",
                           "the same study on a pipeline run's weekly batches: --run RUN_DIR"),
    "safety-scaling": ("llama2.recipes.safety_scaling:cli",
                       "safety RM score, helpfulness and false refusals vs the share of safety data (Figures 15, 33)"),
}
ANNOTATE: Table = {
    "simulate": ("llama2.recipes.annotate:simulate_cli", "a weekly batch judged by the world's simulated annotators"),
    "serve": ("llama2.annotate_serve:cli", "the web annotation tool for human annotators (SQLite store)"),
    "export": ("llama2.recipes.annotate:export_cli", "human judgements as preference records"),
}
# A nested command given options but no subcommand runs this function (`llama2 annotate --simulate ...`, the
# command line from before `annotate` had subcommands).
WITHOUT_SUBCOMMAND = {"llama2 annotate": "llama2.recipes.annotate:cli"}
COMMANDS: Table = {
    "chat": ("llama2.chat:cli", "chat with a model in the terminal (streaming, multi-turn, /reset)"),
    "serve": ("llama2.serve:cli", "OpenAI-compatible HTTP server: continuous batching, safety filter, chat page"),
    "generate": ("llama2.chat:generate_cli", "complete one prompt and print it (or --json)"),
    "tokenize": ("llama2.tokenizer_cli:tokenize_cli", "print the token ids of a text or a chat dialog"),
    "tokenizer": ("llama2.tokenizer_cli:tokenizer_cli", "tokenizer tools: `llama2 tokenizer train`"),
    "convert": ("llama2.convert:convert_cli", "convert checkpoints between native, HF, Meta and GGUF"),
    "pretrain": ("llama2.recipes.pretrain:cli", "pretraining (§2): packed sequences, AdamW + cosine, FSDP"),
    "sft": ("llama2.recipes.sft:cli", "supervised fine-tuning (§3.1): answers-only loss, packed dialogs"),
    "reward": ("llama2.recipes.reward_model:cli", "reward models (§3.2.2): reward train | eval | score"),
    "rlhf": (RLHF, "RLHF (§3.2.3): rejection-sampling, best-of-n, ppo; gatt (§3.3); context-distill (§4.2.4)"),
    "data": (DATA, "data tools: pretokenize, info, validate"),
    "study": (STUDY, "studies of the paper's figures: reward-scaling (Figure 6), safety-scaling (Figures 15, 33)"),
    "pipeline": ("llama2.pipeline:cli", "the whole recipe: world -> pretrain -> SFT -> RLHF V1..Vn -> eval"),
    "redteam": ("llama2.recipes.redteam:cli", "a red-teaming round (§4.3): automated attackers, Likert raters, γ, mitigated share"),
    "evaluate": ("llama2.cli:evaluate_cli", "win rates, violations, false refusals (§3.4, §4.4); multi-turn (§3.3); diversity (§5.1)"),
    "report": ("llama2.report:report_cli", "HTML report of a pipeline run with the paper's plots"),
    "annotate": (ANNOTATE, "preference data (§3.2.1): simulate | serve (human annotation tool) | export"),
    "world": ("llama2.world.generate:world_cli", "the built-in world: llama2 world generate"),
}


def usage(prog: str, table: Table) -> str:
    width = max(map(len, table))
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in table.items()]
    lines += ["", f"Run `{prog} <command> --help` for a command's options."]
    return "\n".join(lines)


def dispatch(prog: str, table: Table, argv: list[str]) -> int:
    """Run the command `argv[0]` of `table` with the rest of argv; usage on -h, exit 2 if unknown."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(prog, table))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown command {name!r}\n\n{usage(prog, table)}", file=sys.stderr)
        return 2
    target, _ = table[name]
    if isinstance(target, dict):
        sub = f"{prog} {name}"
        if rest and rest[0].startswith("-") and rest[0] not in ("-h", "--help") and sub in WITHOUT_SUBCOMMAND:
            return int(load_object(WITHOUT_SUBCOMMAND[sub], sub)(rest) or 0)
        return dispatch(sub, target, rest)
    return int(load_object(target, f"{prog} {name}")(rest) or 0)


def evaluate_cli(argv: list[str]) -> int:
    """`llama2 evaluate multi-turn|diversity|refusal-detector ...` are subcommands; anything else is the
    win-rate evaluation."""
    if argv and argv[0] in EVALUATE:
        return dispatch("llama2 evaluate", EVALUATE, argv)
    return int(load_object("llama2.recipes.evaluate:cli", "llama2 evaluate")(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    # OMP_WAIT_POLICY is chosen when the llama2 package is imported, before torch (llama2/__init__.py).
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch("llama2", COMMANDS, argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FloatingPointError, OSError) as e:
        if os.environ.get("LLAMA2_DEBUG"):
            raise
        print(f"llama2 {argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
