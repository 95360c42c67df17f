"""The compiled batch-1 decoding step (llama2.compiled_decode) against the plain eager model:
logits to tolerance at every step (teacher-forced), greedy tokens equal, fp32 and int8/int4
quantized weights, one compilation for every cache size, stacked and unstacked layers, new weights
after refresh, and the models it refuses."""
import pytest
import torch

from llama2.compiled_decode import CompiledDecode
from llama2.generation import Decoder, SamplingParams
from llama2.model import KVCache, ModelArgs, Transformer
from llama2.quant import quantize_model

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=128)
PROMPTS = [[1, 5, 9, 200, 17], [1, 33, 7], [1, 250, 251, 252, 17, 4, 90, 91, 92]]


def model(seed: int = 0, std: float = 0.08) -> Transformer:
    """A random model whose logits are peaked enough (std) that greedy decoding has clear winners."""
    torch.manual_seed(seed)
    m = Transformer(ARGS)
    m.init_weights(std=std)
    return m.eval()


@torch.inference_mode()
def eager_logits(m: Transformer, tokens: list[int]) -> torch.Tensor:
    """The plain model's next-token logits after every prefix of `tokens` (one full forward)."""
    return m(torch.tensor([tokens]))[0].float()


@torch.inference_mode()
def compiled_logits(m: Transformer, prompt: list[int], continuation: list[int],
                    prefill_model: Transformer) -> torch.Tensor:
    """Eager prefill of `prompt` by `prefill_model`, then `continuation` fed one token at a time
    through `m`'s compiled step: the logits after the prompt's last token and after each fed token."""
    step = CompiledDecode(m)
    dec = Decoder(prefill_model)
    cache = KVCache(ARGS, 1, len(prompt) + len(continuation) + 1, torch.float32, "cpu")
    logits, position = dec.prefill([prompt], cache)
    out = [logits[0]]
    for t in continuation:
        cache.key_mask[:, cache.length] = True
        logits = step(torch.tensor([t]), position, cache)
        position = position + 1
        out.append(logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_logits_match_the_eager_model_at_every_step(quant):
    m = model()
    if quant:
        m = quantize_model(m, quant, 32)
    # The reference for quantized weights is the plain model with the same (dequantised) weights.
    ref_model = model()
    if quant:
        with torch.no_grad():
            for name, mod in m.named_modules():
                if hasattr(mod, "dequantize"):
                    ref_model.get_submodule(name).weight.copy_(mod.dequantize())
    prompt, cont = PROMPTS[2], [3, 77, 150, 9, 9, 42, 201, 5]
    # Prefill by the float model: the quantized eager prefill rounds activations to bf16 (llama2.quant).
    got = compiled_logits(m, prompt, cont, ref_model)
    want = eager_logits(ref_model, prompt + cont)[len(prompt) - 1:]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_greedy_tokens_equal_eager_and_one_compilation_for_every_length():
    from torch._dynamo.utils import counters

    m = model(1)
    eager, compiled = Decoder(m), Decoder(m, compile=True)
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    first = None
    for i, prompt in enumerate(PROMPTS):  # different prompt lengths: different cache sizes
        want = eager.generate([prompt], params)[0]
        got = compiled.generate([prompt], params)[0]
        assert got.tokens == want.tokens
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        if i == 0:
            first = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == first, "a new cache size recompiled the step"


def test_batches_stay_eager(monkeypatch):
    m = model(4)
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    calls = []
    real = CompiledDecode.__call__
    monkeypatch.setattr(CompiledDecode, "__call__", lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a))
    compiled = Decoder(m, compile=True)
    assert [c.tokens for c in compiled.generate(PROMPTS, params)] == [c.tokens for c in Decoder(m).generate(PROMPTS, params)]
    assert calls == []  # three rows: eager
    compiled.generate(PROMPTS[:1], params)
    assert calls and set(calls) == {1}


def test_layers_of_different_kinds_are_not_stacked():
    """A checkpoint mixing float and quantized layers (a GGUF with some F16 projections) keeps one
    entry per layer; the step computes the same either way."""
    m = model(6)
    quantize_model(m, "int8")
    ref_model = model(6)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if hasattr(mod, "dequantize"):
                ref_model.get_submodule(name).weight.copy_(mod.dequantize())
    m.layers[1] = ref_model.layers[1]  # layer 1 float again, layer 0 int8
    assert isinstance(CompiledDecode(m).layers, list)
    assert isinstance(CompiledDecode(ref_model).layers, tuple)
    prompt, cont = PROMPTS[0], [3, 77, 150, 9]
    got = compiled_logits(m, prompt, cont, ref_model)
    want = eager_logits(ref_model, prompt + cont)[len(prompt) - 1:]
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_refresh_reads_the_new_weights():
    m = model(2)
    dec = Decoder(m, compile=True)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    before = dec.generate([PROMPTS[0]], params)[0].tokens
    with torch.no_grad():
        m.load_state_dict(model(3).state_dict())
    dec.refresh()
    assert dec.generate([PROMPTS[0]], params)[0].tokens == Decoder(m).generate([PROMPTS[0]], params)[0].tokens
    assert dec.generate([PROMPTS[0]], params)[0].tokens != before


def test_refuses_what_it_does_not_compile():
    with pytest.raises(ValueError, match="fp32"):
        Decoder(model().to(torch.bfloat16), compile=True)
    rm = Transformer(ModelArgs(**{**ARGS.to_dict(), "head": "scalar"}))
    with pytest.raises(ValueError, match="reward head"):
        CompiledDecode(rm)
