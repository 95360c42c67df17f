"""The environment the trl side of the benchmarks runs in: benchmarks/.venv-trl.

trl 1.12.0 (the last with PPO, in `trl.experimental.ppo`) installed over our exact torch build, so
both sides of a benchmark use the same kernels. Created on first use; `--trl-python` bypasses it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRL_VENV = Path(__file__).resolve().parent / ".venv-trl"


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
