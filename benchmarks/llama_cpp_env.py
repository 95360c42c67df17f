"""llama.cpp's side of benchmarks/generate.py: its own environment and a timing worker.

`llama-cpp-python` (llama.cpp with its own quantized CPU kernels) is built from PyPI's source
distribution into benchmarks/.venv-llamacpp on first use (a few minutes on 2 cores; `--llama-cpp-python`
bypasses it). The worker runs in that environment and imports no torch:

    python benchmarks/llama_cpp_env.py MODEL.gguf --prompt 1,2,3 --new-tokens 128 --threads 2 --repeats 3

It decodes the prompt's continuation greedily (top-k 1), `--new-tokens` tokens whatever they are
(EOS included, as our side ignores EOS), and prints one JSON line: tokens/s per round (prompt
evaluation included, as on our side) and the tokens of the last round.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-llamacpp"
PACKAGE = "llama-cpp-python>=0.3,<0.4"


def llama_cpp_python(given: str | None = None) -> str:
    """`given`, else benchmarks/.venv-llamacpp's python once `import llama_cpp` works there (built if needed)."""
    if given:
        return given
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"], check=False,
                                          capture_output=True).returncode == 0:
        return str(python)
    print(f"[bench] creating {VENV} ({PACKAGE}, compiled from source: a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", PACKAGE], check=True)
    return str(python)


def run(python: str, model: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    """Time llama.cpp in its environment; returns the worker's JSON result."""
    cmd = [python, __file__, str(model), "--prompt", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens),
           "--threads", str(threads), "--repeats", str(repeats)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"llama.cpp worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def worker() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import llama_cpp
    from llama_cpp import Llama

    prompt = [int(t) for t in a.prompt.split(",")]
    llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
                n_ctx=len(prompt) + a.new_tokens + 8, n_batch=512, verbose=False, seed=0)
    rounds, tokens = [], []
    for _ in range(a.repeats + 1):  # the first round warms up
        llm.reset()
        tokens = []
        t = time.perf_counter()
        for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, frequency_penalty=0.0,
                                presence_penalty=0.0, reset=True):  # plain greedy: no penalties
            tokens.append(int(tok))
            if len(tokens) == a.new_tokens:
                break
        rounds.append(a.new_tokens / (time.perf_counter() - t))
    print(json.dumps({"tok_s": rounds[1:], "tokens": tokens, "version": llama_cpp.__version__}))


if __name__ == "__main__":
    worker()
