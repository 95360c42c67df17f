"""Quantized weights (llama2.quant): int8/int4 linear layers, quantized models, their native
checkpoints, GGUF Q8_0/Q4_0/Q4_1 tensors loaded quantized, and the float fallback."""
import copy

import gguf
import pytest
import torch
from safetensors.torch import load_file

from llama2.checkpoint import load_model, save_native
from llama2.checkpoint_base import CheckpointError
from llama2.convert import convert_cli
from llama2.generation import Decoder, SamplingParams
from llama2.inference import load_for_inference
from llama2.model import ModelArgs, Transformer
from llama2.quant import INT4_KERNEL, INT8_KERNEL, QuantLinear, describe, quantize_model

Q = gguf.GGMLQuantizationType
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=128, max_seq_len=64)
PROMPTS = [[1, 5, 9, 200], [1, 33, 7], [1, 250, 251, 252, 17, 4]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


TOKENS = torch.randint(0, ARGS.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))


def tiny_model(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    return model.eval()


@torch.no_grad()
def compare(a: Transformer, b: Transformer) -> tuple[float, float]:
    """(relative logit error, fraction of positions whose greedy next token agrees) on fixed tokens,
    teacher-forced: a random model's free-running decodes part at the first differing token."""
    la, lb = a(TOKENS), b(TOKENS)
    return ((lb - la).norm() / la.norm()).item(), (la.argmax(-1) == lb.argmax(-1)).float().mean().item()


def greedy(model: Transformer, packed: bool | None = None) -> list[list[int]]:
    return [c.tokens for c in Decoder(model, packed=packed).generate(PROMPTS, GREEDY)]


def test_the_cpu_kernels_are_used():
    assert INT8_KERNEL and INT4_KERNEL  # torch 2.13's CPU build has both; the fallback is tested below


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("int4", 0.15)])
@pytest.mark.parametrize("rows", [48, 40])  # 40: the int4 kernel's rows are padded to a multiple of 16
def test_quant_linear_close_to_float(mode, tol, rows):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(rows, 128, generator=g), torch.randn(3, 5, 128, generator=g)
    q = QuantLinear.from_float(w, mode, 32 if mode == "int4" else None)
    ref = x @ w.T
    y = q(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
    # The kernel computes what the dequantised weight does (up to its bfloat16 activations).
    exact = x @ q.dequantize().T
    assert ((y - exact).norm() / exact.norm()).item() < 0.01
    # The fallback (dequantise per call) where no kernel applies.
    q.use_kernel = False
    assert torch.allclose(q(x), exact, atol=1e-5)


def test_int8_is_tighter_than_int4_and_group_64_is_looser_than_32():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    err = {k: (QuantLinear.from_float(w, *k).dequantize() - w).norm().item()
           for k in [("int8", None), ("int4", 32), ("int4", 64)]}
    assert err[("int8", None)] < err[("int4", 32)] < err[("int4", 64)]


def test_bad_modes_and_group_sizes_are_refused():
    with pytest.raises(ValueError, match="mode"):
        QuantLinear.from_float(torch.randn(16, 64), "int2")
    with pytest.raises(ValueError, match="group size"):
        QuantLinear.from_float(torch.randn(16, 64), "int4", 48)


@pytest.mark.parametrize("mode,logit_tol,min_agree", [("int8", 0.03, 0.9), ("int4", 0.15, 0.7)])
def test_quantized_model_close_to_float(mode, logit_tol, min_agree):
    model = tiny_model()
    q = quantize_model(copy.deepcopy(model), mode, 32)
    assert describe(q) == {"layers": {mode + ("/g32" if mode == "int4" else ""): 14},
                           "head": mode + ("/g32" if mode == "int4" else "")}
    assert isinstance(q.tok_embeddings, torch.nn.Embedding) and torch.equal(q.tok_embeddings.weight,
                                                                            model.tok_embeddings.weight)
    rel, agree = compare(model, q)
    assert rel < logit_tol and agree >= min_agree, (rel, agree)
    assert greedy(q, packed=False) == greedy(q)  # the packed (fused) copy decodes the same


def test_float_head_option_and_tied_head():
    args = ModelArgs(**{**ARGS.to_dict(), "tie_embeddings": True})
    model = tiny_model(args)
    q = quantize_model(copy.deepcopy(model), "int8", head=False)
    assert isinstance(q.output, torch.nn.Linear) and q.output.weight is q.tok_embeddings.weight
    q = quantize_model(copy.deepcopy(model), "int4", 64)
    assert isinstance(q.output, QuantLinear) and q.output.group_size == 64
    rel, agree = compare(model, q)
    assert rel < 0.15 and agree >= 0.7, (rel, agree)


@pytest.mark.parametrize("tied", [False, True])
def test_native_round_trip_is_bit_for_bit(tmp_path, tied):
    args = ModelArgs(**{**ARGS.to_dict(), "tie_embeddings": tied})
    q = quantize_model(tiny_model(args), "int4", 32)
    quantize_model(q, "int8")  # already quantized layers stay as they are
    save_native(tmp_path / "q", q)
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert stored["layers.0.attention.wq.weight_q"].dtype == torch.uint8
    assert "layers.0.attention.wq.weight" not in stored
    back, _ = load_model(tmp_path / "q", dequantize=False)
    assert describe(back) == describe(q)
    a, b = q.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert greedy(back) == greedy(q)
    # Dequantised, it is a plain float model with the same weights the integers stand for.
    flat, _ = load_model(tmp_path / "q")
    assert describe(flat) is None
    assert torch.equal(flat.layers[1].feed_forward.w2.weight, q.layers[1].feed_forward.w2.dequantize())


def test_convert_quantize_cli(tmp_path):
    save_native(tmp_path / "f", tiny_model())
    assert convert_cli([str(tmp_path / "f"), str(tmp_path / "q8"), "--quantize", "int8"]) == 0
    assert convert_cli([str(tmp_path / "f"), str(tmp_path / "q4"), "--quantize", "int4", "--group-size", "64",
                        "--float-head"]) == 0
    m8, _ = load_model(tmp_path / "q8", dequantize=False)
    m4, _ = load_model(tmp_path / "q4", dequantize=False)
    assert describe(m8) == {"layers": {"int8": 14}, "head": "int8"}
    assert describe(m4) == {"layers": {"int4/g64": 14}, "head": "float"}
    assert (tmp_path / "q8" / "model.json").read_text().count('"quantization"') == 1
    # Exporting a quantized checkpoint to another format dequantises it.
    assert convert_cli([str(tmp_path / "q8"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf, _ = load_model(tmp_path / "hf")
    assert torch.allclose(hf.layers[0].attention.wq.weight, m8.layers[0].attention.wq.dequantize(), atol=1e-6)


# -- GGUF ------------------------------------------------------------------------------------------


def write_llama_gguf(path, model: Transformer, types: dict[str, Q]) -> None:
    """`model` as a llama GGUF (Meta's q/k layout, as llama.cpp stores it), each projection kind
    ("attn_q", "ffn_down", "output", "token_embd", ...) in the type `types` gives (default F32)."""
    a = model.args
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_vocab_size(a.vocab_size)
    byte_chars = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x17F)]
    tokens = ["<unk>", "<s>", "</s>"] + byte_chars[: a.vocab_size - 3]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (a.vocab_size - 3))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "attention.wq": "attn_q",
             "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
             "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
             "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
    state = model.state_dict()
    if a.tie_embeddings:
        state.pop("output.weight")
    for key, t in state.items():
        parts = key.removesuffix(".weight").split(".")
        if parts[0] == "layers":
            kind = names[".".join(parts[2:])]
            name = f"blk.{parts[1]}.{kind}.weight"
        else:
            kind = names[parts[0]]
            name = f"{kind}.weight"
        arr = t.detach().float().numpy()
        qtype = types.get(kind, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


PROJ = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up"]


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_quantized_tensors_load_quantized(tmp_path, qtype):
    model = tiny_model(ModelArgs(**{**ARGS.to_dict(), "tie_embeddings": True}))
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, model, {**{k: qtype for k in PROJ}, "token_embd": Q.Q8_0})
    quant, tok = load_for_inference(str(path), "cpu")
    flat, _ = load_for_inference(str(path), "cpu", dequantize=True)
    assert tok is not None
    mode = "int8" if qtype == Q.Q8_0 else "int4/g32"
    assert describe(quant) == {"layers": {mode: 14}, "head": "int8"}
    assert describe(flat) is None and flat.output.weight is flat.tok_embeddings.weight  # the old behaviour
    for name, m in quant.named_modules():
        if isinstance(m, QuantLinear) and name != "output":
            ref = flat.get_submodule(name).weight
            if qtype == Q.Q8_0:  # requantized per row: within half a step of the row's scale
                assert ((m.dequantize() - ref).abs() <= m.scales[:, None] / 2 + 1e-6).all()
            else:  # Q4_0/Q4_1 codes and scales kept as they are: exactly the dequantised weights
                assert torch.allclose(m.dequantize(), ref, atol=1e-6, rtol=0)
    rel, agree = compare(flat, quant)
    assert rel < (0.03 if qtype == Q.Q8_0 else 0.15) and agree >= (0.9 if qtype == Q.Q8_0 else 0.7), (rel, agree)
    assert greedy(quant) == greedy(quant, packed=False)
    # Native conversion keeping the GGUF's quantization loads back the same modules.
    assert convert_cli([str(path), str(tmp_path / "n"), "--quantize", "gguf"]) == 0
    back, _ = load_model(tmp_path / "n", dequantize=False)
    a, b = quant.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gguf_unsupported_quant_type_names_the_tensor(tmp_path):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, tiny_model(), {"ffn_down": Q.Q5_0, "attn_q": Q.Q4_0})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_down\.weight is Q5_0.*--dequantize"):
        load_for_inference(str(path), "cpu")
    flat, _ = load_for_inference(str(path), "cpu", dequantize=True)
    assert describe(flat) is None
    # Float GGUF projections stay float when loaded "quantized"; the F32 head too.
    write_llama_gguf(path, tiny_model(), {"attn_q": Q.Q4_1})
    mixed, _ = load_for_inference(str(path), "cpu")
    assert describe(mixed) == {"layers": {"int4/g32": 2}, "head": "float"}
    assert isinstance(mixed.layers[0].attention.wk, torch.nn.Linear)
    assert greedy(mixed) == greedy(mixed, packed=False)  # q fused with float k|v in the packed copy
