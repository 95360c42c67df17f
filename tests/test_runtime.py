"""Process set-up that happens when the llama2 package is imported (before torch)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def policy_after_import(env: dict) -> str:
    """OMP_WAIT_POLICY as a fresh `import llama2` leaves it (and what libgomp then reads)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")}
    code = "import os, llama2; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    r = subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": str(REPO), **env},
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


@pytest.mark.parametrize("env,expected", [
    ({}, "unset"),  # a job alone on the cores: OpenMP's default (spin briefly, then sleep)
    ({"LOCAL_WORLD_SIZE": "1"}, "unset"),
    ({"LOCAL_WORLD_SIZE": "2"}, "PASSIVE"),  # torchrun ranks sharing the node's cores
    ({"LOCAL_WORLD_SIZE": "2", "OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's setting wins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE"),
])
def test_openmp_wait_policy(env, expected):
    assert policy_after_import(env) == expected
