"""Hugging Face import on the config.json files of published models (tests/fixtures/hf_configs/):
what each accepted one becomes, and that what ModelArgs cannot represent is refused by name."""
import json
import shutil
from pathlib import Path

import pytest

from llama2.checkpoint import read_checkpoint
from llama2.checkpoint_base import CheckpointError
from llama2.hf_checkpoint import args_from_hf_config
from llama2.model import ModelArgs, meta_ffn_hidden_dim, preset

CONFIGS = Path(__file__).resolve().parent / "fixtures" / "hf_configs"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def test_llama_2_7b_is_the_paper_7b():
    args = args_from_hf_config(config("Llama-2-7b-hf"), "7b")
    assert args == preset("7B", norm_eps=1e-5)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size, args.hidden_dim) == \
        (4096, 32, 32, 32, 32000, 11008)
    assert (args.norm_eps, args.rope_theta, args.max_seq_len, args.head_dim) == (1e-5, 10000.0, 4096, 128)
    assert not args.tie_embeddings and args.head == "lm"
    assert args.hidden_dim == meta_ffn_hidden_dim(4096, multiple_of=256)  # Meta's params.json rule
    assert args.num_params() == 6_738_415_616  # "7B": the published parameter count


def test_llama_2_70b_is_grouped_query_attention():
    args = args_from_hf_config(config("Llama-2-70b-hf"), "70b")
    assert args == preset("70B", norm_eps=1e-5)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == (8192, 80, 64, 8, 128)
    # params.json: multiple_of 4096, ffn_dim_multiplier 1.3
    assert args.hidden_dim == 28672 == meta_ffn_hidden_dim(8192, multiple_of=4096, ffn_dim_multiplier=1.3)
    assert (args.vocab_size, args.norm_eps, args.rope_theta) == (32000, 1e-5, 10000.0)
    assert args.num_params() == 68_976_648_192


def test_smollm2_135m_instruct():
    args = args_from_hf_config(config("SmolLM2-135M-Instruct"), "smollm2")
    assert args == ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                             norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
                             head_dim=64, head="lm")
    assert isinstance(args.rope_theta, float)
    assert args.num_params() == 134_515_008  # "135M"


def test_mistral_sliding_window_caps_the_context():
    # full causal attention equals Mistral's sliding-window attention only within one window
    args = args_from_hf_config(config("Mistral-7B-v0.1"), "mistral")
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == (4096, 32, 32, 8, 14336)
    assert args.max_seq_len == 4096
    cfg = config("Mistral-7B-v0.1")
    assert args_from_hf_config({**cfg, "sliding_window": None}, "x").max_seq_len == 32768
    assert args_from_hf_config({**cfg, "use_sliding_window": False}, "x").max_seq_len == 32768


def test_defaults_and_the_newer_rope_parameters_field():
    cfg = config("Llama-2-7b-hf")
    for key in ("num_key_value_heads", "rms_norm_eps", "rope_scaling", "tie_word_embeddings"):
        cfg.pop(key)
    args = args_from_hf_config(cfg, "old")  # before GQA, eps and tying were fields: transformers' defaults
    assert (args.n_kv_heads, args.norm_eps, args.tie_embeddings) == (32, 1e-6, False)
    # transformers 5 moved rope_theta into rope_parameters
    new = {**config("SmolLM2-135M-Instruct"), "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert args_from_hf_config(new, "new").rope_theta == 1e6


@pytest.mark.parametrize("name,cfg_patch,match", [
    ("Llama-3.1-8B", {}, "rope_scaling: rope scaling type 'llama3' is not supported"),
    ("vicuna-7b-v1.5-16k", {}, "rope_scaling: rope scaling type 'linear' is not supported"),
    ("llamafied-attention-bias", {}, "attention_bias=true is not a Llama 2 architecture"),
    ("Qwen2.5-0.5B-Instruct", {}, r"not a Llama checkpoint \(model_type='qwen2'"),
    ("Llama-2-7b-hf", {"mlp_bias": True}, "mlp_bias=true"),
    ("Llama-2-7b-hf", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("Llama-2-7b-hf", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling: .*'dynamic'"),
    # transformers 5 spells it rope_parameters; a stale rope_scaling beside it is not ignored either
    ("Llama-2-7b-hf", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters: .*'yarn'"),
    ("Llama-2-7b-hf", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
                       "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling: .*'llama3'"),
    ("Llama-2-7b-hf", {"architectures": ["LlamaForSequenceClassification"], "num_labels": 2},
     "a sequence classifier with 2 labels"),
])
def test_what_llama2_cannot_represent_is_refused_by_name(name, cfg_patch, match):
    with pytest.raises(CheckpointError, match=match):
        args_from_hf_config({**config(name), **cfg_patch}, name)


def test_a_missing_field_is_named():
    cfg = config("Llama-2-7b-hf")
    del cfg["intermediate_size"]
    with pytest.raises(CheckpointError, match="missing field 'intermediate_size'"):
        args_from_hf_config(cfg, "x")


def test_a_refused_checkpoint_directory_names_its_config_before_reading_weights(tmp_path):
    d = tmp_path / "llama-3.1"
    d.mkdir()
    shutil.copy(CONFIGS / "Llama-3.1-8B.json", d / "config.json")
    (d / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"llama-3\.1/config\.json: rope_scaling: rope scaling type 'llama3'"):
        read_checkpoint(d)
