"""Checkpoints: native round trip, Hugging Face import/export, Meta shards, GGUF, and refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama2.checkpoint import detect_format, load_model, read_checkpoint, save_native
from llama2.checkpoint_base import CheckpointError
from llama2.cli import main as cli
from llama2.hf_checkpoint import hf_to_meta_qk, meta_to_hf_qk, save_hf
from llama2.meta_checkpoint import save_meta
from llama2.model import ModelArgs, Transformer, meta_ffn_hidden_dim


def tiny(vocab=300, tie=False, seed=0, kv=2):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=vocab, hidden_dim=96,
                              max_seq_len=64, tie_embeddings=tie))
    m.init_weights(std=0.1)
    return m.eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_qk_permutations_are_inverse():
    w = torch.randn(4 * 16, 64)
    assert torch.equal(hf_to_meta_qk(meta_to_hf_qk(w, 4), 4), w)


@pytest.mark.parametrize("tie", [False, True])
def test_native_round_trip_is_bit_exact(tmp_path, sp_tokenizer, tie):
    m = tiny(tie=tie)
    save_native(tmp_path / "ck", m, tokenizer=sp_tokenizer, meta={"stage": "test"})
    assert detect_format(tmp_path / "ck") == "native"
    loaded, tok = load_model(tmp_path / "ck")
    for (k, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert tok.encode("the llama 42") == sp_tokenizer.encode("the llama 42")
    assert read_checkpoint(tmp_path / "ck").meta["stage"] == "test"
    if tie:
        assert loaded.output.weight is loaded.tok_embeddings.weight
    # saving again replaces the directory atomically, leaving no temporary folders behind
    save_native(tmp_path / "ck", m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("tie,kv", [(False, 4), (False, 2), (True, 1)])
def test_export_to_hf_loads_in_transformers(tmp_path, tie, kv):
    from transformers import LlamaForCausalLM

    m = tiny(tie=tie, kv=kv)
    save_hf(tmp_path / "hf", m.args, m.state_dict())
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - logits(m, x)).abs().max().item() <= 1e-4


def test_import_from_transformers_sharded(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert detect_format(tmp_path / "hf") == "hf"
    ours, _ = load_model(tmp_path / "hf")
    assert ours.args.rope_theta == 500000.0 and ours.args.n_kv_heads == 2
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_convert_cli_native_hf_native_is_bit_exact(tmp_path, sp_tokenizer, capsys):
    m = tiny()
    save_native(tmp_path / "a", m, tokenizer=sp_tokenizer)
    assert cli(["convert", str(tmp_path / "a"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "b")]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "wrote hf checkpoint" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["bos_token_id"] == 1


def test_meta_two_shards(tmp_path, sp_tokenizer):
    """A random Meta-style checkpoint split over 2 model-parallel ranks, as fairscale splits it."""
    m = tiny(vocab=300)
    state = m.state_dict()
    col = ("wq", "wk", "wv", "w1", "w3", "output")  # ColumnParallelLinear: split output rows
    row = ("wo", "w2", "tok_embeddings")  # RowParallelLinear / ParallelEmbedding: split columns
    shards = [{}, {}]
    for k, v in state.items():
        base = k.split(".")[-2]
        if base in col:
            parts = v.chunk(2, dim=0)
        elif base in row:
            parts = v.chunk(2, dim=1)
        else:
            parts = (v, v)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    shards[0]["rope.freqs"] = torch.zeros(8)  # Llama 1 leftovers are ignored
    d = tmp_path / "llama-2-tiny"
    d.mkdir()
    for i, s in enumerate(shards):
        torch.save(s, d / f"consolidated.0{i}.pth")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                               "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}))
    sp_tokenizer.save(tmp_path)  # Meta ships tokenizer.model beside the model folders
    assert detect_format(d) == "meta"
    ours, tok = load_model(d)
    assert ours.args.vocab_size == 300 and ours.args.hidden_dim == 96
    assert all(torch.equal(a, b) for a, b in zip(state.values(), ours.state_dict().values()))
    assert tok is not None and tok.vocab_size == 300


@pytest.mark.parametrize("tie", [False, True])
def test_convert_cli_native_meta_native(tmp_path, sp_tokenizer, capsys, tie):
    """--to meta writes Meta's params.json + consolidated.00.pth (plain tensors, Meta's names and
    rotary layout); the Meta loader reads it back, and converting back gives the same tensors."""
    m = tiny(tie=tie)
    save_native(tmp_path / "a", m, tokenizer=sp_tokenizer)
    assert cli(["convert", str(tmp_path / "a"), str(tmp_path / "meta"), "--to", "meta"]) == 0
    assert "wrote meta checkpoint" in capsys.readouterr().out
    d = tmp_path / "meta"
    assert sorted(p.name for p in d.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert detect_format(d) == "meta"
    params = json.loads((d / "params.json").read_text())
    assert {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")} == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300}
    # Meta's reference code derives the SwiGLU width from multiple_of / ffn_dim_multiplier
    assert meta_ffn_hidden_dim(64, params["multiple_of"], params.get("ffn_dim_multiplier")) == 96
    shard = torch.load(d / "consolidated.00.pth", map_location="cpu", weights_only=True)
    native = m.state_dict()
    assert shard.keys() == native.keys() and all(torch.equal(shard[k], native[k]) for k in native)
    loaded, tok = load_model(d)  # the existing Meta loader
    assert all(torch.equal(a, b) for a, b in zip(native.values(), loaded.state_dict().values()))
    assert tok.encode("the llama 42") == sp_tokenizer.encode("the llama 42")
    assert cli(["convert", str(d), str(tmp_path / "b")]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    if tie:  # Meta's format has no tying: the output matrix comes back as a copy of the embedding
        assert b.keys() == a.keys() | {"output.weight"} and torch.equal(b["output.weight"], a["tok_embeddings.weight"])
    else:
        assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_meta_export_refuses_what_meta_cannot_hold(tmp_path):
    reward = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, hidden_dim=96, head="scalar")
    with pytest.raises(CheckpointError, match="language models only"):
        save_meta(tmp_path / "rm", reward, {})
    wide = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, hidden_dim=96, head_dim=32)
    with pytest.raises(CheckpointError, match="head_dim=32 is not dim // n_heads"):
        save_meta(tmp_path / "wide", wide, {})
    assert not list(tmp_path.iterdir())


def test_meta_refuses_pickled_code(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    torch.save({"x": torch.zeros(1), "payload": ModelArgs()}, d / "consolidated.00.pth")  # a pickled object
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot be read as plain tensors"):
        load_model(d)


def test_loaders_name_missing_unexpected_and_mismatched_tensors(tmp_path):
    m = tiny()
    save_native(tmp_path / "ck", m)
    weights = tmp_path / "ck" / "model.safetensors"
    state = load_file(weights)
    del state["layers.1.feed_forward.w2.weight"]
    state["layers.0.attention.wq.weight"] = torch.zeros(3, 3)
    state["layers.0.extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ck")
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "missing tensors: layers.1.feed_forward.w2.weight" in msg
    assert "unexpected tensors: layers.0.extra.weight" in msg
    assert "layers.0.attention.wq.weight: expected [64, 64], got [3, 3]" in msg


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        detect_format(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        detect_format(tmp_path / "nope")
    assert cli(["convert", str(tmp_path), str(tmp_path / "out")]) == 1


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(smollm2_gguf)


def test_smollm2_gguf_greedy_matches_transformers(smollm2_gguf, smollm2):
    """Our greedy continuation of a chat prompt equals transformers' on the same dequantised weights."""
    from transformers import AutoModelForCausalLM

    from llama2.chat_format import ChatFormat
    from llama2.generation import Decoder, SamplingParams

    model, tok = smollm2
    assert model.args.tie_embeddings and model.args.n_kv_heads == 3 and model.args.vocab_size == 49152
    fmt = ChatFormat(tok)
    ids = fmt.prompt_ids([{"role": "user", "content": "Name three colours of the rainbow and explain why the sky is blue."}])
    n = 40
    ours = Decoder(model, tok).generate([ids], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0]
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=tok.eos_id)
    theirs = out[0, len(ids):].tolist()
    assert ours.tokens[:32] == theirs[:32]
    assert len(ours.tokens) == n
