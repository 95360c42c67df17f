"""The training engine every stage shares: optimizer, schedule, checkpoints, logging (Llama 2 §2.2).

Recipes keep their loop visible and call these helpers:
- `build_optimizer`: AdamW(β1 0.9, β2 0.95, eps 1e-5), weight decay 0.1 on matrices only.
- `lr_at`: linear warmup, then cosine decay to 10% of the peak (or constant, as PPO uses).
- `Checkpointer`: atomic, keep-last-N checkpoints of model + optimizer (sharded with
  torch.distributed.checkpoint, so FSDP runs save without gathering), RNG states per rank, and a
  JSON train state (step, data-loader position, resolved config); resuming is exact.
- `MetricsLogger`: a progress bar (loss, lr, tokens/s, MFU), a JSONL file, TensorBoard if installed.
- `peak_flops`: the denominator of MFU (measured fp32 matmul peak on CPU, datasheet on GPUs).
- `keep_freed_memory`: malloc settings that spare CPU training its page faults.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from llama2 import progress_bars
from llama2.cpu_kernels import ONEDNN_LINEAR
from llama2.distributed import Dist, barrier


@dataclass
class OptimConfig:
    lr: float = 3.0e-4  # peak learning rate (§2.2: 3e-4 for 7B/13B, 1.5e-4 for 34B/70B)
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 2000  # §2.2: 2000 warmup steps
    warmup_ratio: float = 0.0  # warmup = max(warmup_steps, ceil(ratio * total)); reward models: 3%
    min_lr_ratio: float = 0.1  # cosine decays to 10% of the peak
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-5
    grad_clip: float = 1.0
    loss_scale: float = 2.0**16  # dtype float16 only: the initial dynamic loss scale (see LossScaler)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices (dim >= 2: projections, embeddings) and none on norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over parameter, gradient and both moments) on CPU as on GPU: fewer
    # passes over memory than `foreach` or the per-tensor loop, both slower on CPU. It is also what
    # transformers' Trainer uses by default (torch >= 2.8).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc keep and reuse freed blocks instead of returning them to the kernel.

    PyTorch's CPU allocator is plain malloc, and glibc serves blocks above 128 KiB-32 MiB (its
    dynamic mmap threshold) with fresh `mmap`s that it unmaps on free: every activation and gradient
    of a training step then arrives as new pages that the kernel must fault in and zero. For the
    20M benchmark model (`benchmarks/train_step.py`) that was ~155,000 minor page faults and
    ~0.3 s of system time per 1.5 s step; with the thresholds raised, ~4,000 and ~0.02 s, and ~5%
    more tokens/s. (PyTorch's CPU tuning guide recommends jemalloc/tcmalloc for the same reason;
    this needs no preloaded library.) The cost: the process keeps up to `threshold` bytes of freed
    memory mapped. Called by the recipes on CPU; a no-op off glibc or with LLAMA2_SYSTEM_MALLOC=1.
    Returns whether the setting took effect.
    """
    if os.environ.get("LLAMA2_SYSTEM_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: leave it alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return max(cfg.warmup_steps, math.ceil(cfg.warmup_ratio * total_steps))


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to the peak, then cosine
    decay reaching `min_lr_ratio * lr` at the last step; `constant` keeps the peak after warmup."""
    warm = min(warmup_steps(cfg, total_steps), total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r} (cosine | constant)")
    span = max(1, total_steps - 1 - warm)
    progress = min(1.0, (step - warm) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware under FSDP2); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


class LossScaler:
    """Dynamic loss scaling for float16 training; for bf16 and fp32 every method is a pass-through.

    fp16 gradients of small losses underflow to zero, so the loss is multiplied by `scale` before
    backward and the gradients divided by it before clipping. A step whose (global) gradient norm is
    not finite overflowed: it is skipped and the scale halved; after `growth_interval` clean steps
    in a row the scale doubles. These are torch.amp.GradScaler's rules and defaults (2^16 to start,
    x0.5, x2 every 2000 steps); the decision is ours because it is taken on the norm that
    `clip_grad_norm` all-reduces, so that every FSDP rank skips the same steps (GradScaler decides
    on each rank's own shard), as Megatron-LM's and fairseq's scalers do.
    """

    def __init__(self, dtype: torch.dtype, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled = dtype == torch.float16
        self.scale = init_scale if self.enabled else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0  # steps since the last overflow or growth

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, *models: torch.nn.Module) -> None:
        """Divide the gradients by the scale (call before clipping)."""
        if self.enabled:
            grads = [p.grad for m in models for p in m.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / self.scale)

    def step(self, grad_norm: float, *optimizers: torch.optim.Optimizer) -> bool:
        """Step the optimizers unless the gradients overflowed; update the scale. True if they stepped."""
        if self.enabled and not math.isfinite(grad_norm):
            self.scale /= 2.0
            self.clean_steps = 0
            return False
        for opt in optimizers:
            opt.step()
        if self.enabled:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= 2.0
                self.clean_steps = 0
        return True

    def metrics(self, skipped: int) -> dict:
        """What a recipe logs: the scale and how many steps overflowed (nothing unless float16)."""
        return {"loss_scale": self.scale, "skipped": skipped} if self.enabled else {}

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps} if self.enabled else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast where it helps; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()[1].tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 0, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """The one seed scheme for sub-streams of a run: the seed of (run seed, version, iteration,
    chunk, ...) as numpy's SeedSequence hashes them. Streams of different parts are independent (no
    arithmetic like seed * 1000 + i, where two different tuples can meet), and a resumed or
    multi-rank run that asks for the same parts gets the same seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ----------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """`out_dir/checkpoints/step-00000100/` holding
        model + optimizer  torch.distributed.checkpoint files (sharded by rank under FSDP)
        rng-<rank>.pt      each rank's RNG states
        train_state.json   step, data position, resolved config, ... (written last: marks it complete)
    Written under a temporary name and renamed when complete; the last `keep` are kept."""

    def __init__(self, out_dir: str | Path, d: Dist, keep: int = 3):
        self.root = Path(out_dir) / "checkpoints"
        self.d = d
        self.keep = keep

    def latest(self) -> Path | None:
        if not self.root.is_dir():
            return None
        done = sorted(p for p in self.root.glob("step-*") if (p / "train_state.json").is_file())
        return done[-1] if done else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> Path:
        # torch.distributed's checkpoint modules take seconds to import (llama2.distributed.setup)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if self.d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.d)
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            payload = {"model": model_sd, "optim": optim_sd}
        else:
            payload = {"model": get_state_dict(model, [])[0]}
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(payload, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng-{self.d.rank}.pt")
        barrier(self.d)
        if self.d.is_main:
            (tmp / "train_state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier(self.d)
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "train_state.json").is_file())
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Restore model, optimizer and this rank's RNG in place; return the train state."""
        import torch.distributed.checkpoint as dcp  # seconds to import: see save()
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            payload = {"model": model_sd, "optim": optim_sd}
        else:
            payload = {"model": get_state_dict(model, [])[0]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(payload, checkpoint_id=str(path))
        set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=payload["model"],
                       optim_state_dict=payload.get("optim", {}))
        rng_file = path / f"rng-{self.d.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return json.loads((path / "train_state.json").read_text())


# ----------------------------------------------------------------------------- logging and MFU


class MetricsLogger:
    """Rank 0 logs: a tqdm bar, `metrics.jsonl`, and TensorBoard events when tensorboard is installed."""

    def __init__(self, out_dir: str | Path, d: Dist, total: int, desc: str, initial: int = 0,
                 filename: str = "metrics.jsonl"):
        self.enabled = d.is_main
        self.bar = None
        self.tb = None
        if not self.enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / filename, "a")
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                        disable=not progress_bars())
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: the `tensorboard` extra

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, step: int, metrics: dict, advance: int = 1, show: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if advance:
            self.bar.update(advance)
        if show:
            self.bar.set_postfix({k: _fmt(metrics[k]) for k in show if k in metrics}, refresh=False)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


# Dense bf16 datasheet peaks; the first key found in the device name wins (PCIe/NVL H100s before SXM).
_GPU_PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """MFU denominator: the datasheet dense peak on known GPUs, a measured fp32 matmul peak on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in _GPU_PEAK_BF16.items():
            if key in name:
                return val if dtype in (torch.bfloat16, torch.float16) else val / 2
        return 0.0
    return measured_matmul_peak(torch.get_num_threads())


_PEAK_CACHE: dict[int, float] = {}


def matmul_peaks(sizes: tuple[int, ...] = (768, 1536), repeats: int = 3) -> dict[str, float]:
    """Best FLOP/s of square fp32 matmuls (2·n³ per product) with the current thread count, per
    kernel library: MKL (`torch.mm`) and, where the build has it, oneDNN (the op `cpu_kernels.linear` uses).

    The model runs its large products through oneDNN, which on AVX-512 AMD CPUs is faster than
    MKL, so the MFU denominator must include it: a peak from MKL alone would flatter our MFU.
    """
    libs = {"mkl": lambda a, b: torch.mm(a, b)}
    if ONEDNN_LINEAR is not None:
        libs["onednn"] = lambda a, b: ONEDNN_LINEAR(a, b.t(), None, "none", [None], "")
    best = dict.fromkeys(libs, 0.0)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for name, mm in libs.items():
            mm(a, b)  # warm-up: thread pool, kernel selection
            for _ in range(repeats):
                t = time.perf_counter()
                mm(a, b)
                best[name] = max(best[name], 2 * n**3 / (time.perf_counter() - t))
    return best


def measured_matmul_peak(threads: int) -> float:
    """FLOP/s of the fastest large fp32 matmul with `threads` threads (see `matmul_peaks`), cached per process."""
    if threads not in _PEAK_CACHE:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _PEAK_CACHE[threads] = max(matmul_peaks().values())
        finally:
            torch.set_num_threads(previous)
    return _PEAK_CACHE[threads]


class Throughput:
    """Tokens/s and MFU over the last logging window."""

    def __init__(self, flops_per_token: float, peak: float, world_size: int):
        self.fpt, self.peak, self.world = flops_per_token, peak, world_size
        self.t = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> tuple[float, float]:
        now = time.perf_counter()
        tps = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        mfu = tps * self.fpt / (self.peak * self.world) if self.peak else 0.0
        return tps, mfu
