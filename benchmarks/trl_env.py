"""The environment the trl side of the benchmarks runs in: benchmarks/.venv-trl.

trl 1.12.0 (the last with PPO, in `trl.experimental.ppo`) installed over our exact torch build, so
both sides of a benchmark use the same kernels. Created on first use; `--trl-python` bypasses it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TRL_VENV = Path(__file__).resolve().parent / ".venv-trl"
REPO = Path(__file__).resolve().parent.parent


def trl_python(given: str | None = None, probe: str = "trl") -> str:
    """`given`, else benchmarks/.venv-trl's python once `import {probe}` works there (created if needed)."""
    if given:
        return given
    python = TRL_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", f"import {probe}"], check=False,
                                          capture_output=True).returncode == 0:
        return str(python)
    import torch

    version = torch.__version__.split("+")[0]
    print(f"[bench] creating {TRL_VENV} (torch=={version}, then trl==1.12.0) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={version}"], check=True)  # our build first, so pip keeps it
    subprocess.run(pip + ["trl==1.12.0"], check=True)
    return str(python)


def run_trl_worker(cmd: list[str], env: dict, what: str = "trl"):
    """Run a benchmark's trl side (a subprocess in the trl venv); its last stdout line is its JSON result."""
    r = subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{what} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def stand_in_tokenizer(vocab_size: int, pad_id: int, eos_id: int, bos_id: int | None = None,
                       padding_side: str = "right"):
    """A word-level tokenizer whose token i is named `id{i}`, for trl workers fed token ids: trl only
    pads and reads the special ids. Runs inside the trl venv."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bos = {} if bos_id is None else {"bos_token": f"id{bos_id}"}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"id{i}": i for i in range(vocab_size)}, unk_token="id0")),
        pad_token=f"id{pad_id}", eos_token=f"id{eos_id}", padding_side=padding_side, **bos)
