"""Pretraining (Llama 2 §2): next-token prediction on packed sequences, AdamW + cosine, FSDP.

    llama2 pretrain --config configs/pretrain/tiny.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 8 -m llama2 pretrain --config configs/pretrain/7B.yaml

Setup prepares the data once (rank 0): the built-in world's corpus unless `data.corpus` names
files, a SentencePiece tokenizer trained the paper's way if `data.tokenizer` does not exist yet,
and memory-mapped token shards. Then one visible loop: gradient accumulation up to the global
batch (given in tokens), clipping, AdamW, logging, evaluation, atomic checkpoints. The final
weights are exported in the native format that `llama2 chat` loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama2.checkpoint import build_model, read_checkpoint, save_native
from llama2.config import ConfigError, save_config
from llama2.data import PackedLoader, TokenDataset
from llama2.distributed import all_reduce_mean, barrier, full_state_dict, setup, teardown
from llama2.losses import lm_loss
from llama2.pretokenize import pretokenize
from llama2.recipes.common import (build_fresh_model, config_dict, kill_hook, model_args, place_model, recipe_cli,
                                   resume_latest)
from llama2.tokenizer import load_tokenizer, train_sentencepiece
from llama2.train import (Checkpointer, LossScaler, MetricsLogger, OptimConfig, Throughput, autocast, build_optimizer,
                          clip_grad_norm, lr_at, peak_flops, resolve_dtype, seed_everything, set_lr)
from llama2.world.generate import generate_world


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=lambda: ["builtin"])  # text inputs, or "builtin" (the world)
    dataset: str = ""  # an already pretokenized dataset directory (skips `corpus`)
    tokenizer: str = ""  # tokenizer path; default OUT/tokenizer, trained on the corpus if missing
    train_tokenizer: bool = True  # train a SentencePiece BPE tokenizer (§2.2) when `tokenizer` is missing
    field: str = "text"  # JSONL/Parquet field holding the text
    seq_len: int = 4096  # §2.2: context length 4096
    val_fraction: float = 0.01  # held-out documents for the validation loss
    workers: int = 2  # pretokenizing processes
    world_size: str = "tiny"  # size of the built-in world when corpus is "builtin"
    world_seed: int = 0


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    preset: str = "7B"  # model size preset (tiny, 7B, 13B, 34B, 70B)
    model: dict = field(default_factory=dict)  # ModelArgs overrides, e.g. {dim: 256, n_layers: 6}
    init_from: str = ""  # start from these weights (any format `llama2 convert` reads)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_tokens: int = 4 * 1024 * 1024  # global batch, tokens per optimizer step (§2.2: 4M)
    micro_batch_size: int = 1  # sequences per rank per forward/backward
    tokens: int = 2_000_000_000_000  # training length (§2.2: 2T tokens)...
    max_steps: int = 0  # ...or a number of optimizer steps (wins when > 0)
    dtype: str = "auto"  # bf16 where supported, else fp32
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "auto"


def prepare_data(cfg: PretrainConfig, d, vocab_size: int) -> tuple[Path, Path]:
    """(tokenizer path, token dataset dir); rank 0 builds what is missing, the others wait."""
    out = Path(cfg.out_dir)
    dc = cfg.data
    tok = Path(dc.tokenizer) if dc.tokenizer else out / "tokenizer"
    dataset = Path(dc.dataset) if dc.dataset else out / "tokens"
    if d.is_main:
        inputs = list(dc.corpus)
        if not dc.dataset and inputs == ["builtin"]:
            inputs = [str(builtin_corpus(out / "world", dc.world_seed, dc.world_size))]
        if not tok.exists():
            if not dc.train_tokenizer or dc.dataset:
                raise ConfigError(f"data.tokenizer: {tok} does not exist (train one with `llama2 tokenizer train`)")

            print(f"[pretrain] training a {vocab_size}-token SentencePiece tokenizer -> {tok}", flush=True)
            train_sentencepiece(inputs, tok, vocab_size=vocab_size)
        if not (dataset / "manifest.json").is_file():
            if dc.dataset:
                raise ConfigError(f"data.dataset: {dataset} has no manifest.json (make it with `llama2 data pretokenize`)")
            pretokenize(inputs, tok, dataset, workers=dc.workers, field=dc.field)
    barrier(d)
    return tok, dataset


def builtin_corpus(world_dir: Path, seed: int, size: str) -> Path:
    """The built-in world's pretraining corpus, generated on first use."""
    corpus = world_dir / "corpus" / "pretrain.jsonl"
    if not corpus.is_file():
        generate_world(world_dir, seed=seed, size=size)
    return corpus


def validation_loss(model, loader_factory, batches: int, d, dtype) -> float:
    """Mean next-token loss over the first `batches` validation batches."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader_factory()):
            if i >= batches:
                break
            batch = {k: v.to(d.device) for k, v in batch.items()}
            with autocast(d.device, dtype):
                logits = model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"])
            total += lm_loss(logits, batch["targets"]).item()
            count += 1
    model.train()
    return all_reduce_mean(total / max(count, 1), d)


def main(cfg: PretrainConfig, resume: bool = False) -> int:
    d = setup(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    args = model_args(cfg.preset, cfg.model)
    dtype = resolve_dtype(cfg.dtype, d.device)

    # ---- data
    tok_path, dataset_dir = prepare_data(cfg, d, args.vocab_size)
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size != args.vocab_size:
        raise ConfigError(f"the tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model has "
                          f"vocab_size={args.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    dataset = TokenDataset.open(dataset_dir, tokenizer=tok_path)
    train_set, val_set = dataset.split(cfg.data.val_fraction, seed=cfg.seed)
    T = cfg.data.seq_len
    if T > args.max_seq_len:
        raise ConfigError(f"data.seq_len={T} exceeds the model's max_seq_len={args.max_seq_len}")
    rows_per_step = cfg.micro_batch_size * d.world_size
    if cfg.batch_tokens % (rows_per_step * T):
        raise ConfigError(f"batch_tokens={cfg.batch_tokens} is not a multiple of micro_batch_size x seq_len x "
                          f"world_size = {rows_per_step * T}")
    accum = cfg.batch_tokens // (rows_per_step * T)
    total_steps = cfg.max_steps or max(1, cfg.tokens // cfg.batch_tokens)
    loader = PackedLoader(train_set, T, cfg.micro_batch_size, rank=d.rank, world_size=d.world_size, seed=cfg.seed)

    def val_loader():
        return PackedLoader(val_set, T, cfg.micro_batch_size, rank=d.rank, world_size=d.world_size,
                            shuffle=False, epochs=1)

    # ---- model and optimizer
    if cfg.init_from:
        ck = read_checkpoint(cfg.init_from)
        args = ck.args  # the checkpoint decides the architecture
        model = build_model(args, ck.state, ck.source).train()
    else:
        model = build_fresh_model(args, cfg.seed).train()
    model = place_model(model, d, dtype, cfg.activation_checkpointing, cfg.compile)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = LossScaler(dtype, cfg.optim.loss_scale)  # float16 only: dynamic loss scaling
    ckpt = Checkpointer(out, d, keep=cfg.keep_checkpoints)
    start = 0
    if resume:
        saved = resume_latest(ckpt, model, optimizer, cfg, ["preset", "model", "batch_tokens", "data.seq_len", "seed"])
        loader.load_state_dict(saved["loader"])
        scaler.load_state_dict(saved.get("scaler"))
        start = saved["step"]
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # ---- the loop
    log = MetricsLogger(out, d, total_steps, "pretrain", initial=start)
    speed = Throughput(args.flops_per_token(T), peak_flops(d.device, dtype), d.world_size)
    if start == 0:
        log.write(f"[pretrain] {args.num_params() / 1e6:.1f}M parameters; {total_steps} steps of "
                  f"{cfg.batch_tokens} tokens ({accum} x {rows_per_step} x {T}); out: {out}")
    model.train()
    for step in range(start, total_steps):
        lr = lr_at(step, cfg.optim, total_steps)
        set_lr(optimizer, lr)
        loss_sum = 0.0
        for _ in range(accum):
            batch = {k: v.to(d.device, non_blocking=True) for k, v in next(loader).items()}
            with autocast(d.device, dtype):
                logits = model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"])
            loss = lm_loss(logits, batch["targets"]) / accum
            scaler.scaled(loss).backward()
            loss_sum += loss.item()
        scaler.unscale_(model)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
        loss_avg = all_reduce_mean(loss_sum, d)
        if not math.isfinite(loss_avg) or not (math.isfinite(grad_norm) or scaler.enabled):
            last = ckpt.latest()
            log.close()
            raise FloatingPointError(f"step {step}: loss {loss_avg} / grad norm {grad_norm} is not finite; "
                                     f"stopping. Last good checkpoint: {last or 'none'} (resume with --resume)")
        stepped = scaler.step(grad_norm, optimizer)  # fp16: an overflowed step is skipped
        optimizer.zero_grad(set_to_none=True)
        speed.add(cfg.batch_tokens)
        metrics = {"loss": loss_avg, "lr": lr, "grad_norm": grad_norm if stepped else 0.0}
        metrics.update(scaler.metrics(int(not stepped)))
        if (step + 1) % cfg.log_every == 0 or step == start:
            tps, mfu = speed.read()
            metrics.update(tokens_per_s=tps, mfu=mfu)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
            metrics["val_loss"] = validation_loss(model, val_loader, cfg.eval_batches, d, dtype)
        log.log(step + 1, metrics, show=("loss", "val_loss", "lr", "tokens_per_s", "mfu"))
        if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == total_steps):
            ckpt.save(step + 1, model, optimizer, {"loader": loader.state_dict(), "scaler": scaler.state_dict(),
                                                   "config": config_dict(cfg)})
        kill_hook(step + 1)
    log.close()

    # ---- export
    state = full_state_dict(model, d)
    if d.is_main:
        final = save_native(out / "final", state, args, tokenizer,
                            meta={"stage": "pretrain", "steps": total_steps, "config": config_dict(cfg)})
        print(f"[pretrain] done: {final}  (chat with it: llama2 chat --model {final})", flush=True)
    teardown()
    return 0


def cli(argv: list[str]) -> int:
    return recipe_cli(argv, PretrainConfig, main, "llama2 pretrain", __doc__.split("\n\n")[0])
