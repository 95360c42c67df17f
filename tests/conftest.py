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
