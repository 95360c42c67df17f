"""`llama2 annotate --simulate`: one weekly batch of preference pairs (Llama 2 §3.2.1), with the
built-in world's simulated annotators judging answers sampled from your policies."""
from __future__ import annotations

import argparse
import sys

from llama2.formats import AXES, read_records, write_jsonl
from llama2.sampling import sample_responses
from llama2.world.annotators import AnnotatorConfig, annotate_batch


def cli(argv: list[str]) -> int:
    """`llama2 annotate --simulate --policy A [--policy B] --prompts FILE --out FILE`: one weekly
    batch of simulated preferences, sampled from the policies at the given temperatures."""
    ap = argparse.ArgumentParser(prog="llama2 annotate", description=cli.__doc__)
    ap.add_argument("--simulate", action="store_true", help="annotate with the world's simulated annotators")
    ap.add_argument("--policy", action="append", required=True, metavar="MODEL",
                    help="a model variant to sample from (repeat for two variants)")
    ap.add_argument("--prompts", required=True, help="prompt records (JSONL or Parquet)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0],
                    help="sampling temperatures; each prompt's two answers come from two (policy, temperature) arms")
    ap.add_argument("--out", required=True, help="where to write the preference pairs (JSONL)")
    ap.add_argument("--batch", type=int, default=0, help="the weekly batch number written on every pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--axis", choices=("auto",) + AXES, default="auto",
                    help="auto: safety for is_safety prompts, helpfulness otherwise")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--noise", type=float, default=AnnotatorConfig.noise, help="annotators' perception noise")
    ap.add_argument("--lapse", type=float, default=AnnotatorConfig.lapse, help="annotators' slip rate")
    args = ap.parse_args(argv)
    if not args.simulate:
        ap.error("only --simulate is available: human annotation happens outside this tool")
    if args.batch < 0:
        ap.error("--batch must be >= 0")

    records = read_records(args.prompts, "prompts")
    held_out = sum(r["split"] == "eval" for r in records)
    if held_out:  # the eval split is never used for training: say so rather than fail the batch
        print(f"{args.prompts}: skipping {held_out} eval-split prompts", file=sys.stderr)
        records = [r for r in records if r["split"] != "eval"]

    def sample_fn(batch_records, model_path, temperature):
        return sample_responses(model_path, batch_records, temperature, args.seed, args.max_new_tokens)

    config = AnnotatorConfig(noise=args.noise, lapse=args.lapse)
    pairs, stats = annotate_batch(records, sample_fn, variants=args.policy, temperatures=args.temperatures,
                                  batch=args.batch, seed=args.seed, axis=args.axis, config=config)
    write_jsonl(args.out, pairs)
    s = stats.summary()
    print(f"{args.out}: {s['pairs']} pairs from {s['prompts']} prompts "
          f"({s['ties_skipped']} identical and {s['empty_skipped']} empty answers skipped, {s['dropped_unsafe_chosen']} unsafe-chosen dropped)",
          file=sys.stderr)
    print(f"ratings {s['ratings']}; safety labels {s['safety_labels']}", file=sys.stderr)
    return 0
