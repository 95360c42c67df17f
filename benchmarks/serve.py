"""`llama2 serve` under load: N concurrent streaming clients vs the same requests one at a time.

Starts `llama2 serve` on the bundled SmolLM2-135M-Instruct (or `--model`) on a free localhost
port, then sends `--requests` streaming chat requests (different questions, `--max-tokens` new
tokens, seeded sampling) first one at a time, then from each number of `--clients` concurrent
clients. For each: completion tokens/s over the wall time, p50/p95 time to first token and
request latency, errors (non-200, exceptions) and drops (a stream that ends without `[DONE]`),
and the throughput ratio to the one-at-a-time run.

    python benchmarks/serve.py [--clients 1 4 16 64] [--requests 64] [--max-tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?", "Give me three tips for learning to cook.", "Why is the sky blue?",
    "Write a short poem about the sea.", "How do plants make food?", "What is a prime number?",
    "Explain what a computer does, simply.", "Name some animals that live in the ocean.",
    "How can I sleep better?", "What is the difference between weather and climate?",
    "Tell me a fun fact about space.", "How do I make a cup of tea?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, i: int, max_tokens: int) -> dict:
    """One streaming chat request: seconds to the first content, total seconds, tokens, ok/dropped."""
    body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                if first is None and any(c.get("delta", {}).get("content") for c in obj["choices"]):
                    first = time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"error": type(e).__name__}
    return {"ttft": first if first is not None else time.perf_counter() - t0, "latency": time.perf_counter() - t0,
            "tokens": tokens, "dropped": not done}


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, i, max_tokens), range(requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": requests, "seconds": round(wall, 2), "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50": round(quantile([r["ttft"] for r in ok], 0.5), 3),
        "ttft_p95": round(quantile([r["ttft"] for r in ok], 0.95), 3),
        "latency_p50": round(quantile([r["latency"] for r in ok], 0.5), 3),
        "latency_p95": round(quantile([r["latency"] for r in ok], 0.95), 3),
        "errors": len(results) - len(ok), "dropped": sum(r["dropped"] for r in ok),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=64, help="requests per run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, "-m", "llama2", "serve", "--port", str(port), "--log-level", "warning",
           "--max-concurrent", str(max(a.clients)), "--max-batch", str(max(a.clients))]
    if a.model:
        cmd += ["--model", a.model]
    server = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                sys.exit("the server exited before answering /health")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                sys.exit("the server did not answer /health in 300 s")
            time.sleep(0.5)
        one_request(url, 0, 8)  # warm-up
        base = run_level(url, 1, a.requests, a.max_tokens)
        base["clients"] = "sequential"
        rows = [base] + [run_level(url, n, a.requests, a.max_tokens) for n in a.clients if n > 1]
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)

    cols = ["clients", "requests", "seconds", "tokens", "tokens_per_s", "ttft_p50", "ttft_p95", "latency_p50",
            "latency_p95", "errors", "dropped"]
    print(f"\nllama2 serve, {a.requests} streaming requests of up to {a.max_tokens} tokens, server threads {a.threads}")
    print(" | ".join(cols) + " | throughput vs sequential")
    for r in rows:
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else float("nan")
        print(" | ".join(str(r[c]) for c in cols) + f" | {ratio:.2f}x")
    served = [line for line in metrics.splitlines() if line.startswith("llama2_requests_total")]
    print("server /metrics:", "; ".join(served))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
