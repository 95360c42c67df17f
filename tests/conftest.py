import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


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
