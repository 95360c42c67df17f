import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One thread count for this process and every subprocess the tests start (they inherit os.environ):
# float sums split over a different number of threads differ in the last bits, and several tests
# compare a subprocess's losses or sampled texts exactly with this process's (or another
# subprocess's). torchrun ranks set 1 thread each explicitly. Set before torch is imported.
THREADS = 2
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)

import pytest
import torch

torch.set_num_threads(THREADS)


def chromium(height: int = 2000):
    """A headless Chromium driven by selenium (Debian's chromium + chromium-driver, `make browser`):
    skipped with the reason where they are absent, a failure under CI, which must have them."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and chromium-driver (make browser installs them)")
        pytest.skip("no chromium/chromedriver here (`make browser` installs Debian's)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size=1280,{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def check_reference(path: Path, got: dict) -> dict:
    """The values stored at `path` (step -> value, or step -> {name: value}), checked to hold exactly
    the steps (and names) of `got`. With LLAMA2_UPDATE_REFERENCE=1 it writes `got` there and fails
    the run that did it: a regenerated reference is never also the one the run is checked against."""
    got = {str(k): v for k, v in got.items()}
    if os.environ.get("LLAMA2_UPDATE_REFERENCE"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
        pytest.fail(f"reference regenerated: {path} ({len(got)} steps); check the diff, commit it and rerun "
                    "without LLAMA2_UPDATE_REFERENCE", pytrace=False)
    ref = json.loads(path.read_text())
    assert isinstance(ref, dict) and ref, f"{path}: empty reference"
    assert sorted(ref, key=int) == sorted(got, key=int), f"{path}: steps {sorted(ref, key=int)}, run logged " \
                                                         f"{sorted(got, key=int)}"
    for step, values in got.items():
        if isinstance(values, dict):
            assert set(ref[step]) == set(values), (path, step, sorted(ref[step]), sorted(values))
    return ref


@pytest.fixture(scope="session")
def reference():
    """`check_reference` for the tests that compare with stored losses (tests/assets/losses/)."""
    return check_reference


def pytest_configure(config):
    config.addinivalue_line("markers", "machine: measures the machine (allocator, profiler, timing); bounded "
                                       "loosely, skipped where the machine does not show the measured effect")


@pytest.fixture(scope="session")
def smollm2_gguf():
    from llama2.paths import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A small SentencePiece tokenizer trained the paper's way (a few seconds)."""
    import random

    from llama2.tokenizer import train_sentencepiece

    words = ("the llama walks over green hills and eats grass while the sun shines on a small "
             "town where people ask questions and get helpful answers about numbers").split()
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("sp_tok")
    lines = [" ".join(rng.choice(words) for _ in range(10)) + f" {rng.randint(0, 9999)}." for _ in range(800)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    return train_sentencepiece([d / "corpus.txt"], d / "tok", vocab_size=300)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """The built-in world at its tiny size (deterministic, a few seconds)."""
    from llama2.world.generate import generate_world

    d = tmp_path_factory.mktemp("world") / "world"
    generate_world(d, seed=0, size="tiny", quiet=True)
    return d


@pytest.fixture(scope="session")
def world_tokenizer(world_dir, tmp_path_factory):
    """A SentencePiece tokenizer trained on the world's corpus (about a second)."""
    from llama2.tokenizer import train_sentencepiece

    return train_sentencepiece([world_dir / "corpus" / "pretrain.jsonl"], tmp_path_factory.mktemp("wtok") / "tok",
                               vocab_size=1024)


@pytest.fixture(scope="session")
def tiny_policy(world_tokenizer, tmp_path_factory):
    """A random 64-wide chat model with the world's tokenizer, saved natively (read-only for tests)."""
    from llama2.checkpoint import save_native
    from llama2.model import ModelArgs, Transformer

    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=world_tokenizer.vocab_size,
                              hidden_dim=128, max_seq_len=256))
    m.init_weights()
    d = tmp_path_factory.mktemp("tiny_policy") / "policy"
    save_native(d, m, tokenizer=world_tokenizer)
    return d
