"""llama2: the complete system of the Llama 2 paper (Touvron et al., 2023) on PyTorch."""
import os

__version__ = "0.1.0"


def _openmp_wait_policy() -> None:
    """Choose how PyTorch's idle OpenMP threads wait, before torch is imported (libgomp reads it once).

    - One process on the machine's cores (a recipe, the pipeline, chat): OpenMP's default, where a
      thread spins a few ms after each parallel region before it sleeps. Small models run
      thousands of short ops per second, and waking a sleeping thread each time costs more than
      the spin (measured on PPO's tiny preset: docs/results.md).
    - Several ranks of one job on the node (torchrun, LOCAL_WORLD_SIZE > 1): PASSIVE. Threads that
      spin while another process needs the core slow every rank down many times over.
    An explicit OMP_WAIT_POLICY always wins: set PASSIVE yourself when other jobs share the cores
    (the test suite does, as it runs recipes in subprocesses beside itself).
    """
    if "OMP_WAIT_POLICY" not in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE") or 1) > 1:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


_openmp_wait_policy()


def progress_bars() -> bool:
    """Whether to draw progress bars: yes unless LLAMA2_NO_PROGRESS=1 (logs, CI, tests)."""
    return os.environ.get("LLAMA2_NO_PROGRESS") != "1"
