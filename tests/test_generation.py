"""Batched KV-cache generation: batching invariance, the packed CPU path, sampling and stopping."""
import pytest
import torch

from llama2.generation import Decoder, GenerationStats, SamplingParams, sample
from llama2.model import KVCache, ModelArgs, Transformer
from llama2.packed_decode import PackedModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=128,
                              max_seq_len=96))
    m.init_weights(std=0.15)
    return m.eval()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("packed", [False, True])
def test_mixed_lengths_batch_equals_one_by_one(model, packed):
    gen = Decoder(model, packed=packed)
    ps = prompts([1, 5, 17, 9, 30])
    params = SamplingParams(max_new_tokens=24, temperature=0)
    batch = gen.generate(ps, params)
    for p, b in zip(ps, batch):
        alone = gen.generate([p], params)[0]
        assert b.tokens == alone.tokens
        assert max(abs(x - y) for x, y in zip(b.logprobs, alone.logprobs)) < 1e-4


@pytest.mark.parametrize("packed", [False, True])
def test_prefill_in_length_groups_equals_one_by_one(model, packed, monkeypatch):
    # 40 prompts sorted longest first, one long and many short: the prefill runs in groups of 16
    # rows, each padded to its own longest prompt, and every row still decodes what it would alone.
    gen = Decoder(model, packed=packed)
    ps = sorted(prompts([50, *[3 + i % 7 for i in range(39)]], seed=1), key=len, reverse=True)
    calls = []
    run_rows = gen._prefill_rows
    monkeypatch.setattr(gen, "_prefill_rows", lambda p, c: calls.append(max(map(len, p))) or run_rows(p, c))
    params = SamplingParams(max_new_tokens=10, temperature=0)
    batch = gen.generate(ps, params)
    assert calls == [50, 6, 4]  # three groups of 16, 16, 8 rows; the last two padded to 6 and 4 positions, not 50
    monkeypatch.undo()
    for p, b in zip(ps, batch):
        alone = gen.generate([p], params)[0]
        assert b.tokens == alone.tokens
        assert max(abs(x - y) for x, y in zip(b.logprobs, alone.logprobs)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_path_in_half_precision(model, dtype):
    """A bf16/fp16 model (PPO generates with its training dtype) decodes through the packed CPU path
    as through the module: the same logits to the dtype's rounding, rotary output kept in that dtype."""
    half = Transformer(model.args)
    half.load_state_dict(model.state_dict())
    half = half.to(dtype).eval()
    x, pos = torch.tensor([prompts([11])[0]]), torch.arange(11)[None]
    caches = [KVCache(model.args, 1, 16, dtype, "cpu") for _ in range(2)]
    for c in caches:
        c.key_mask[:, :11] = True
    with torch.no_grad():
        la = half(x, positions=pos, cache=caches[0])
    lb = PackedModel(half)(x, positions=pos, cache=caches[1], last_only=False)
    assert (la - lb).abs().max().item() < 0.1 * la.abs().max().item()
    out = Decoder(half, packed=True).generate(prompts([4, 7]), SamplingParams(max_new_tokens=8, temperature=0))
    assert all(len(o.tokens) == 8 for o in out)


def test_packed_path_equals_module_path(model):
    ps = prompts([4, 11, 2])
    params = SamplingParams(max_new_tokens=20, temperature=0)
    a = Decoder(model, packed=False).generate(ps, params)
    b = Decoder(model, packed=True).generate(ps, params)
    assert [x.tokens for x in a] == [y.tokens for y in b]
    # and the packed forward matches the module's logits on a prefill + decode
    cache_a, cache_b = (KVCache(model.args, 1, 16, torch.float32, "cpu") for _ in range(2))
    x = torch.tensor([ps[1]])
    pos = torch.arange(11)[None]
    for c in (cache_a, cache_b):
        c.key_mask[:, :11] = True
    with torch.no_grad():
        la = model(x, positions=pos, cache=cache_a)
    lb = PackedModel(model)(x, positions=pos, cache=cache_b, last_only=False)
    assert (la - lb).abs().max().item() < 1e-4


def test_logprobs_are_the_models(model):
    p = prompts([6])[0]
    out = Decoder(model).generate([p], SamplingParams(max_new_tokens=8, temperature=0))[0]
    seq = torch.tensor([p + out.tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0], -1)
    expect = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(out.tokens)]
    assert max(abs(a - b) for a, b in zip(out.logprobs, expect)) < 1e-4


def test_seeded_sampling_is_reproducible_and_varies(model):
    gen = Decoder(model)
    ps = prompts([3, 8])
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    a, b = gen.generate(ps, params), gen.generate(ps, params)
    assert [x.tokens for x in a] == [y.tokens for y in b]
    c = gen.generate(ps, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=8))
    assert [x.tokens for x in a] != [y.tokens for y in c]


def test_sampling_frequencies_match_the_tempered_softmax():
    # The inverse-CDF sampler draws each token with its probability under logits / temperature:
    # 40,000 draws (a batch of 4,000 rows, 10 steps) land within 4 standard errors of softmax(l / T).
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, float("-inf"), 0.0])
    T = 0.8
    expect = torch.softmax(logits / T, -1)
    g = torch.Generator().manual_seed(0)
    batch = logits.expand(4000, -1)
    counts = torch.zeros(6)
    for _ in range(10):
        counts += torch.bincount(sample(batch, SamplingParams(temperature=T, top_p=1.0), g), minlength=6)
    freq = counts / counts.sum()
    se = (expect * (1 - expect) / counts.sum()).sqrt()
    assert counts[4] == 0  # probability 0 is never drawn
    assert ((freq - expect).abs() <= 4 * se + 1e-9).all(), (freq, expect)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    k2 = {sample(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=2), g).item() for _ in range(300)}
    assert k2 == {0, 1}
    p = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g).item() for _ in range(300)}
    assert p == {0, 1}  # 0.5 < 0.7 <= 0.8: the nucleus is the two top tokens
    p_all = {sample(logits, SamplingParams(temperature=1.0, top_p=1.0), g).item() for _ in range(2000)}
    assert p_all == {0, 1, 2, 3}
    assert sample(logits, SamplingParams(temperature=0), g).item() == 0


def test_stop_ids_finish_rows_early_and_others_continue(model):
    gen = Decoder(model)
    ps = prompts([5, 7])
    free = gen.generate(ps, SamplingParams(max_new_tokens=20, temperature=0))
    stop = free[0].tokens[3]  # the 4th token of row 0 becomes a stop token
    out = gen.generate(ps, SamplingParams(max_new_tokens=20, temperature=0, stop_ids=(stop,)))
    first = free[0].tokens.index(stop)
    assert out[0].tokens == free[0].tokens[:first] and out[0].finish_reason == "stop"
    assert out[0].stop_token == stop
    cut = free[1].tokens.index(stop) if stop in free[1].tokens else 20
    assert out[1].tokens == free[1].tokens[:cut]
    ignored = gen.generate(ps, SamplingParams(max_new_tokens=20, temperature=0, stop_ids=(stop,), ignore_eos=True))
    assert [c.tokens for c in ignored] == [c.tokens for c in free]
    assert all(c.finish_reason == "length" for c in ignored)


def test_streaming_and_stats(model, sp_tokenizer):
    torch.manual_seed(1)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=sp_tokenizer.vocab_size, hidden_dim=64,
                              max_seq_len=64)).eval()
    m.init_weights(std=0.3)
    gen = Decoder(m, sp_tokenizer)
    seen = []
    stats = GenerationStats()
    prompt = sp_tokenizer.encode("the llama", bos=True)
    out = gen.generate([prompt] * 2,
                       SamplingParams(max_new_tokens=12, temperature=0), on_token=lambda r, t: seen.append((r, t)),
                       stats=stats)
    assert [t for r, t in seen if r == 0] == out[0].tokens
    assert out[0].text == sp_tokenizer.decode(out[0].tokens)
    assert stats.prefill_tokens == 2 * len(prompt) and stats.decode_tokens == 24 and stats.decode_tps > 0


def test_stop_strings_cut_the_text(sp_tokenizer):
    torch.manual_seed(2)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=sp_tokenizer.vocab_size, hidden_dim=64,
                              max_seq_len=64)).eval()
    m.init_weights(std=0.3)
    gen = Decoder(m, sp_tokenizer)
    prompt = [sp_tokenizer.encode("the", bos=True)]
    free = gen.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0))[0]
    stop = free.text.strip()[3:6]
    assert stop and stop in free.text
    out = gen.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0, stop_strings=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:free.text.find(stop)]


def test_prompt_too_long_is_refused(model):
    with pytest.raises(ValueError, match="does not fit the context"):
        Decoder(model).generate([[5] * 96], SamplingParams(max_new_tokens=4))
