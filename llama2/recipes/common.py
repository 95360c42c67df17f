"""What every recipe does the same way: parse `--config FILE key=value…`, build and save the model, write atomically.

Kept deliberately small (torchtune: "code duplication is preferred over unnecessary
abstractions"): the loops themselves live in the recipes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable, TypeVar

import torch
import yaml

from llama2.config import ConfigError, load_config, save_config, to_dict
from llama2.distributed import Dist, apply_fsdp
from llama2.model import ModelArgs, Transformer, preset
from llama2.train import keep_freed_memory

C = TypeVar("C")


def recipe_cli(argv: list[str], cls: type[C], main: Callable[..., int | None], prog: str, doc: str) -> int:
    """`llama2 <stage> --config FILE [--resume] [--print-config] [key=value ...]`."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                epilog="Overrides use dotted keys, e.g. optim.lr=1e-4 model.dim=256.")
    p.add_argument("--config", help="YAML file (see configs/); defaults come from the recipe's dataclass")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    cfg = load_config(cls, a.config, a.overrides)
    if a.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    return int(main(cfg, resume=a.resume) or 0)


def split_overrides(values: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """A flag with several values (`--prompts A B`) also takes the `key=value` overrides after it:
    (the values, the overrides among them)."""
    if values is None:
        return None, []
    return [v for v in values if "=" not in v] or None, [v for v in values if "=" in v]


def model_args(preset_name: str, overrides: dict) -> ModelArgs:
    try:
        return preset(preset_name, **overrides)
    except TypeError as e:
        raise ConfigError(f"model: {e}") from None


def build_fresh_model(args: ModelArgs, seed: int) -> Transformer:
    """A freshly initialised model, identical on every rank (same seed), on CPU in fp32."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def place_model(model: Transformer, d: Dist, param_dtype: torch.dtype, activation_checkpointing: bool = False,
                compile: bool = False) -> Transformer:
    """Move to the rank's device; shard with FSDP2 when distributed; optional block-wise compile."""
    model.activation_checkpointing = activation_checkpointing
    if d.device.type == "cpu":
        keep_freed_memory()
    if compile:
        for block in model.layers:
            block.compile()
    if d.enabled:
        # FSDP2 moves each shard to the mesh's device; compute runs in param_dtype.
        model.to(d.device)
        apply_fsdp(model, d, param_dtype=None if param_dtype == torch.float32 else param_dtype)
    else:
        model.to(d.device)
    return model


def kill_hook(step: int, env: str = "LLAMA2_KILL_AT_STEP") -> None:
    """Testing aid: LLAMA2_KILL_AT_STEP=k kills this process (SIGKILL, no cleanup) after step k,
    so that tests can check that a killed run resumes exactly. Stages with other units of work
    name their own variable (rejection sampling: LLAMA2_KILL_AT_SAMPLE_CHUNK)."""
    at = os.environ.get(env)
    if at is not None and int(at) == step:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def resume_latest(ckpt, model, optimizers, cfg, keys: list[str]) -> dict:
    """`--resume`: the latest checkpoint of `ckpt` loaded into model and optimizer(s), refused when
    the config changed one of `keys` since it was written. Returns the checkpoint's extra state."""
    path = ckpt.latest()
    if path is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpt.root}")
    saved = ckpt.load(path, model, optimizers)
    check_resume_compatible(saved["config"], config_dict(cfg), keys, path)
    return saved


def check_resume_compatible(saved: dict, current: dict, keys: list[str], where: Path) -> None:
    """Refuse to resume with a config that changes what the checkpoint was trained as."""
    for key in keys:
        a, b = _get(saved, key), _get(current, key)
        if a != b:
            raise ConfigError(f"{where}: cannot resume: {key} was {a!r} in the checkpoint, now {b!r}")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else None
    return tree


def config_dict(cfg) -> dict:
    return to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def write_atomic(path: Path, text: str) -> None:
    """Write then rename: a killed run leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def open_run(out: Path, cfg, resume: bool, resume_keys, what: str) -> None:
    """A recipe's run directory: with `resume`, the saved config must agree with `cfg` on
    `resume_keys`; without, `out` must not already hold a run. Then `cfg` is saved there."""
    if resume:
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"--resume: no {what} run in {out} (no config.yaml)")
        saved = load_config(type(cfg), out / "config.yaml")
        check_resume_compatible(config_dict(saved), config_dict(cfg), resume_keys, out / "config.yaml")
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"out_dir: {out} already holds a run; add --resume to continue it, or choose another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")


def link_final(out: Path, target: Path) -> Path:
    """RUN/final -> `target` (a checkpoint inside `out`), replaced atomically."""
    link, tmp = out / "final", out / ".final.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(Path(target).relative_to(out), tmp)
    os.replace(tmp, link)
    return link
