"""`llama2 annotate simulate` (also `llama2 annotate --simulate`): one weekly batch of preference pairs
(Llama 2 §3.2.1), with the built-in world's simulated annotators judging answers sampled from your
policies; and `llama2 annotate export`: the judgements of human annotators, collected by
`llama2 annotate serve` (llama2/annotate_serve.py), as preference records."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama2.annotation_store import AnnotationStore, export_records
from llama2.formats import AXES, read_records, write_jsonl
from llama2.sampling import sample_responses
from llama2.world.annotators import AnnotatorConfig, annotate_batch


def cli(argv: list[str]) -> int:
    """`llama2 annotate --simulate ...` (options without a subcommand): the simulated batch, as before the
    subcommands; without --simulate it says which subcommand to use."""
    return simulate_cli(argv, legacy=True)


def simulate_cli(argv: list[str], legacy: bool = False) -> int:
    """`llama2 annotate simulate --policy A [--policy B] --prompts FILE --out FILE`: one weekly
    batch of simulated preferences, sampled from the policies at the given temperatures."""
    ap = argparse.ArgumentParser(prog="llama2 annotate" if legacy else "llama2 annotate simulate",
                                 description=simulate_cli.__doc__)
    ap.add_argument("--simulate", action="store_true",
                    help="required without the `simulate` subcommand (`llama2 annotate --simulate`), implied with it")
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
    if legacy and not args.simulate:
        ap.error("give --simulate for simulated annotators, or a subcommand: `llama2 annotate simulate | serve "
                 "(the web tool for human annotators) | export`")
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


def export_cli(argv: list[str]) -> int:
    """`llama2 annotate export --db DB --out pairs.jsonl [--batch N] [--split-test 0.1]`: the stored human
    judgements as preference records (`llama2 data validate` and `llama2 reward train` read them)."""
    ap = argparse.ArgumentParser(prog="llama2 annotate export", description=export_cli.__doc__)
    ap.add_argument("--db", required=True, help="the SQLite file of `llama2 annotate serve`")
    ap.add_argument("--out", required=True, help="where to write the preference pairs (JSONL)")
    ap.add_argument("--batch", type=int, help="only this weekly batch (default: all)")
    ap.add_argument("--split-test", type=float, default=0.0,
                    help="share of dialogs (by prompt, or by dialog for written prompts) put in the test split")
    args = ap.parse_args(argv)
    if not Path(args.db).is_file():
        raise FileNotFoundError(f"{args.db}: no such annotation database")
    store = AnnotationStore(args.db)
    try:
        records, stats = export_records(store, args.batch, args.split_test)
    finally:
        store.close()
    write_jsonl(args.out, records)
    dropped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in stats.dropped.items())
    print(f"{args.out}: {stats.written} pairs ({stats.splits['train']} train, {stats.splits['test']} test) from "
          f"{stats.judgements} judgements; dropped {dropped}", file=sys.stderr)
    return 0
