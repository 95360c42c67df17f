"""Supervised fine-tuning (Llama 2 §3.1): dialogs in the chat format, loss on answers only.

    llama2 sft --config configs/sft/tiny.yaml [model=runs/pretrain/final] [key=value ...] [--resume]

Paper defaults: cosine schedule, lr 2e-5, weight decay 0.1, batch 64 sequences of 4096 tokens,
2 epochs; prompts and answers packed to fill the sequence (with the packed-attention mask here,
so that packed dialogs do not see each other). Options the paper's recipe needs later:
`last_turn_only` (Ghost Attention trains only the last answer, §3.3) and `pretrain_mix` (mix the
pretraining loss in, which kept a tiny model from forgetting its pretraining facts).
The result loads in `llama2 chat`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama2.chat_format import ChatFormat
from llama2.checkpoint import build_model, read_checkpoint, save_native
from llama2.config import ConfigError, save_config
from llama2.data import PackedLoader, TokenDataset
from llama2.dialog_data import DialogLoader, tokenize_dialogs
from llama2.distributed import all_reduce_mean, all_reduce_sum, full_state_dict, setup, teardown
from llama2.formats import read_records
from llama2.losses import IGNORE, lm_loss
from llama2.recipes.common import config_dict, kill_hook, place_model, recipe_cli, resume_latest
from llama2.train import (Checkpointer, LossScaler, MetricsLogger, OptimConfig, Throughput, autocast, build_optimizer,
                          clip_grad_norm, lr_at, peak_flops, resolve_dtype, seed_everything, set_lr)


def sft_optim() -> OptimConfig:
    # §3.1: lr 2e-5, cosine, weight decay 0.1. Warmup is unspecified: 3% of the steps, as in
    # common open SFT recipes (e.g. Alpaca/torchtune), so the new chat tokens do not shock the model.
    return OptimConfig(lr=2e-5, warmup_steps=0, warmup_ratio=0.03)


@dataclass
class SFTConfig:
    out_dir: str = "runs/sft"
    model: str = ""  # checkpoint to fine-tune (native/HF/Meta/GGUF); required
    train_data: list[str] = field(default_factory=list)  # SFT dialog files (JSONL/Parquet, see docs/data.md)
    eval_data: list[str] = field(default_factory=list)  # held-out dialogs for the validation loss
    chat_format: str = "auto"  # auto (the tokenizer's template if any) | llama2 | template
    seq_len: int = 4096  # §3.1
    batch_size: int = 64  # packed sequences per optimizer step, all ranks together (§3.1)
    micro_batch_size: int = 1  # sequences per rank per forward/backward
    epochs: float = 2.0  # §3.1: 2 epochs
    packed: bool = True  # pack dialogs to fill seq_len (§3.1); False = one dialog per row
    last_turn_only: bool = False  # train only on the last answer of each dialog (GAtt, §3.3)
    pretrain_data: str = ""  # pretokenized dataset (llama2 data pretokenize) for `pretrain_mix`
    pretrain_mix: float = 0.0  # loss = (1 - mix) * SFT + mix * pretraining loss
    optim: OptimConfig = field(default_factory=sft_optim)
    dtype: str = "auto"
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"


def load_dialogs(paths: list[str], split: str | None = None) -> list[dict]:
    records = []
    for p in paths:
        records += [r for r in read_records(p, "sft") if split is None or r.get("split", split) == split]
    return records


def answer_positions(targets: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions with a loss (answer tokens): the `keep` of the model's forward,
    which then runs the head (and the last block's feed-forward) there only, not on prompts."""
    return (targets.flatten() != IGNORE).nonzero().squeeze(1)


def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the logits (K, V) at positions `keep` of targets (B, T)."""
    return lm_loss(logits[None], targets.flatten()[keep][None], reduction="sum")


def answer_logits(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    return model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"], keep=keep)


def answer_loss(model, loader, d, dtype) -> float:
    """Mean loss per answer token over the whole eval set."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(d.device) for k, v in batch.items()}
            keep = answer_positions(batch["targets"])
            with autocast(d.device, dtype):
                logits = answer_logits(model, batch, keep)
            total += torch.tensor([masked_ce_sum(logits, batch["targets"], keep).item(), len(keep)],
                                  dtype=torch.float64)
    model.train()
    total = all_reduce_sum(total, d)
    return (total[0] / total[1].clamp(min=1)).item()


def main(cfg: SFTConfig, resume: bool = False) -> int:
    if not cfg.model:
        raise ConfigError("model: the checkpoint to fine-tune is required (e.g. model=runs/pretrain/final)")
    if not cfg.train_data:
        raise ConfigError("train_data: at least one SFT dialog file is required")
    d = setup(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    dtype = resolve_dtype(cfg.dtype, d.device)

    # ---- model, tokenizer, data
    ck = read_checkpoint(cfg.model)
    tokenizer = ck.tokenizer()
    if tokenizer is None:
        raise ConfigError(f"model: {cfg.model} has no tokenizer")
    args = ck.args
    fmt = ChatFormat(tokenizer, cfg.chat_format)
    T = min(cfg.seq_len, args.max_seq_len)
    train = tokenize_dialogs(load_dialogs(cfg.train_data), fmt, T, cfg.last_turn_only, "train_data: ")
    rows_per_step = cfg.micro_batch_size * d.world_size
    if cfg.batch_size % rows_per_step:
        raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size x world_size "
                          f"= {rows_per_step}")
    accum = cfg.batch_size // rows_per_step
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    loader = DialogLoader(train, T, cfg.micro_batch_size, rank=d.rank, world_size=d.world_size, seed=cfg.seed,
                          packed=cfg.packed, pad_id=pad)
    if len(loader.rows(0)) < cfg.batch_size:  # packing gives every epoch the same number of rows
        raise ConfigError(f"train_data: {len(train)} dialogs pack into {len(loader.rows(0))} rows of {T} tokens, "
                          f"fewer than one batch (batch_size={cfg.batch_size} rows); lower batch_size and "
                          f"micro_batch_size, or give more data")
    steps_per_epoch = len(loader.rows(0)) // cfg.batch_size
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_examples = tokenize_dialogs(load_dialogs(cfg.eval_data), fmt, T, cfg.last_turn_only, "eval_data: ") \
        if cfg.eval_data else None

    def eval_loader():
        return DialogLoader(eval_examples, T, cfg.micro_batch_size, rank=d.rank, world_size=d.world_size,
                            shuffle=False, epochs=1, pad_id=pad)

    pretrain = None
    if cfg.pretrain_mix > 0:
        if not cfg.pretrain_data:
            raise ConfigError("pretrain_mix > 0 needs pretrain_data (a pretokenized dataset directory)")
        pretrain = PackedLoader(TokenDataset.open(cfg.pretrain_data, tokenizer=tokenizer), T, cfg.micro_batch_size,
                                rank=d.rank, world_size=d.world_size, seed=cfg.seed)

    model = place_model(build_model(args, ck.state, ck.source).train(), d, dtype, cfg.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = LossScaler(dtype, cfg.optim.loss_scale)  # float16 only: dynamic loss scaling
    ckpt = Checkpointer(out, d, keep=cfg.keep_checkpoints)
    start = 0
    if resume:
        saved = resume_latest(ckpt, model, optimizer, cfg, ["model", "train_data", "seq_len", "batch_size", "seed",
                                                            "packed", "last_turn_only"])
        loader.load_state_dict(saved["loader"])
        scaler.load_state_dict(saved.get("scaler"))
        if pretrain is not None:
            pretrain.load_state_dict(saved["pretrain_loader"])
        start = saved["step"]
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    log = MetricsLogger(out, d, total_steps, "sft", initial=start)
    if start == 0:
        skipped = f", skipped {train.skipped}" if train.skipped else ""
        log.write(f"[sft] {len(train)} dialogs ({train.trained_tokens} answer tokens{skipped}); "
                  f"packing fills {loader.utilisation():.1%} of each row; {total_steps} steps of {cfg.batch_size} x {T}")
    speed = Throughput(args.flops_per_token(T), peak_flops(d.device, dtype), d.world_size)
    model.train()
    for step in range(start, total_steps):
        lr = lr_at(step, cfg.optim, total_steps)
        set_lr(optimizer, lr)
        batches = [{k: v.to(d.device) for k, v in next(loader).items()} for _ in range(accum)]
        # Normalise by the answer tokens of the whole global batch, so that the update is the mean
        # over tokens however the batch is split into micro-batches and ranks.
        n_tokens = all_reduce_sum(torch.tensor(float(sum((b["targets"] != IGNORE).sum().item() for b in batches))), d)
        scale = d.world_size / n_tokens.clamp(min=1).item()  # FSDP averages gradients over ranks
        sft_sum, pt_sum = 0.0, 0.0
        for batch in batches:
            keep = answer_positions(batch["targets"])
            with autocast(d.device, dtype):
                logits = answer_logits(model, batch, keep)
            loss = masked_ce_sum(logits, batch["targets"], keep) * scale
            sft_sum += loss.item() / d.world_size
            if pretrain is not None:
                pb = {k: v.to(d.device) for k, v in next(pretrain).items()}
                with autocast(d.device, dtype):
                    pt_logits = model(pb["tokens"], positions=pb["positions"], doc_ids=pb["doc_ids"])
                pt_loss = lm_loss(pt_logits, pb["targets"]) / accum
                pt_sum += pt_loss.item()
                loss = (1 - cfg.pretrain_mix) * loss + cfg.pretrain_mix * pt_loss
            scaler.scaled(loss).backward()
        scaler.unscale_(model)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
        sft_loss = all_reduce_sum(torch.tensor(sft_sum), d).item()
        if not math.isfinite(sft_loss) or not (math.isfinite(grad_norm) or scaler.enabled):
            log.close()
            raise FloatingPointError(f"step {step}: loss {sft_loss} / grad norm {grad_norm} is not finite; stopping. "
                                     f"Last good checkpoint: {ckpt.latest() or 'none'}")
        stepped = scaler.step(grad_norm, optimizer)  # fp16: an overflowed step is skipped
        optimizer.zero_grad(set_to_none=True)
        speed.add(cfg.batch_size * T)
        metrics = {"loss": sft_loss, "lr": lr, "grad_norm": grad_norm if stepped else 0.0, "epoch": loader.epoch}
        metrics.update(scaler.metrics(int(not stepped)))
        if pretrain is not None:
            metrics["pretrain_loss"] = all_reduce_mean(pt_sum, d)
        if (step + 1) % cfg.log_every == 0 or step == start:
            metrics["tokens_per_s"], metrics["mfu"] = speed.read()
        if eval_examples is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
            metrics["val_loss"] = answer_loss(model, eval_loader(), d, dtype)
        log.log(step + 1, metrics, show=("loss", "val_loss", "lr", "tokens_per_s"))
        if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == total_steps):
            extra = {"loader": loader.state_dict(), "scaler": scaler.state_dict(), "config": config_dict(cfg)}
            if pretrain is not None:
                extra["pretrain_loader"] = pretrain.state_dict()
            ckpt.save(step + 1, model, optimizer, extra)
        kill_hook(step + 1)
    log.close()

    state = full_state_dict(model, d)
    if d.is_main:
        final = save_native(out / "final", state, args, tokenizer,
                            meta={"stage": "sft", "steps": total_steps, "config": config_dict(cfg)})
        print(f"[sft] done: {final}  (chat with it: llama2 chat --model {final})", flush=True)
    teardown()
    return 0


def cli(argv: list[str]) -> int:
    return recipe_cli(argv, SFTConfig, main, "llama2 sft", __doc__.split("\n\n")[0])
