"""The model against Hugging Face's LlamaForCausalLM, the KV cache and packed attention."""
import pytest
import torch

from llama2 import cpu_kernels
from llama2.hf_checkpoint import meta_to_hf_name, meta_to_hf_qk
from llama2.cpu_kernels import Ragged, linear
from llama2.model import KVCache, ModelArgs, PRESETS, RMSNorm, Transformer, meta_ffn_hidden_dim, preset

CONFIGS = {
    "mha-untied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "gqa-untied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "gqa-tied": dict(n_heads=8, n_kv_heads=2, tie_embeddings=True),
    "mqa-tied": dict(n_heads=4, n_kv_heads=1, tie_embeddings=True),
}


def tiny_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    base = dict(dim=64, n_layers=2, vocab_size=101, hidden_dim=160, max_seq_len=64, rope_theta=10000.0)
    m = Transformer(ModelArgs(**{**base, **kw}))
    m.init_weights(std=0.1)  # larger than default so that differences would show in the logits
    return m.eval()


def to_hf(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
                      tie_word_embeddings=a.tie_embeddings, attention_bias=False)
    hf = LlamaForCausalLM(cfg).eval()
    state = {}
    for k, v in model.state_dict().items():
        if a.tie_embeddings and k == "output.weight":
            continue
        if k.endswith("wq.weight"):
            v = meta_to_hf_qk(v, a.n_heads)
        elif k.endswith("wk.weight"):
            v = meta_to_hf_qk(v, a.n_kv_heads)
        state[meta_to_hf_name(k)] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    model = tiny_model(**CONFIGS[name])
    hf = to_hf(model)
    tokens = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_presets_match_paper_table1():
    # SPEC §1: dim / layers / heads / kv heads / MLP hidden.
    expect = {"7B": (4096, 32, 32, 32, 11008), "13B": (5120, 40, 40, 40, 13824),
              "34B": (8192, 48, 64, 8, 22016), "70B": (8192, 80, 64, 8, 28672)}
    for name, (d, L, h, kv, hid) in expect.items():
        a = PRESETS[name]
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim) == (d, L, h, kv, hid)
        assert a.vocab_size == 32000 and a.max_seq_len == 4096 and not a.tie_embeddings
    # Meta's sizing rule reproduces the table (70B: ffn_dim_multiplier 1.3, multiple_of 4096).
    assert meta_ffn_hidden_dim(4096) == 11008 and meta_ffn_hidden_dim(5120) == 13824
    assert meta_ffn_hidden_dim(8192, 4096, 1.3) == 28672
    assert abs(PRESETS["7B"].num_params() / 1e9 - 6.74) < 0.01
    assert 2e6 < PRESETS["tiny"].num_params() < 6e6


def test_unknown_and_invalid_config():
    with pytest.raises(ValueError, match="unknown model config keys: bogus"):
        ModelArgs.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="not a multiple"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("3B")


def test_kv_cache_decoding_equals_full_forward():
    model = tiny_model(**CONFIGS["gqa-untied"])
    tokens = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, 2, 24, torch.float32, "cpu")
        cache.key_mask[:, :10] = True
        steps = [model(tokens[:, :10], cache=cache)]
        for t in range(10, 24):
            cache.key_mask[:, cache.length] = True
            steps.append(model(tokens[:, t:t + 1], cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


def test_packed_documents_do_not_attend_to_each_other():
    model = tiny_model(**CONFIGS["gqa-tied"])
    docs = [torch.randint(0, 101, (n,)) for n in (7, 12, 5)]
    row = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(row, positions=positions, doc_ids=doc_ids)
        alone = torch.cat([model(d[None]) for d in docs], dim=1)
    assert (packed - alone).abs().max().item() < 1e-5
    # and the mask matters: without doc ids the later documents see the earlier ones
    with torch.no_grad():
        leaky = model(row, positions=positions)
    assert (leaky - alone).abs().max().item() > 1e-2


@pytest.mark.parametrize("name,lengths,groups", [
    # in the given order: alone, alone, two padded to 12, three of one length (no padded copy)
    ("mha-untied", (7, 1, 12, 11, 5, 5, 5), [(1, 7, True), (1, 1, True), (2, 12, False), (3, 5, True)]),
    # longest first, as reward scoring sends them
    ("gqa-tied", (12, 11, 7, 5, 5, 5, 1), [(2, 12, False), (1, 7, True), (3, 5, True), (1, 1, True)]),
])
def test_ragged_row_equals_each_sequence_alone_with_gradients(name, lengths, groups):
    """Sequences end to end in one unpadded row (`lengths=`, PPO's update and reward scoring): each
    computes as if alone, logits and weight gradients, with checkpointing too; a 1-token one included."""
    model = tiny_model(**CONFIGS[name]).train()
    seqs = [torch.randint(0, 101, (n,)) for n in lengths]
    ragged = Ragged(lengths)
    assert [(g.batch, g.max_len, g.index is None) for g in ragged.groups] == groups
    weights = [torch.randn(len(s), 101) for s in seqs]

    def run(ragged: bool, checkpointing: bool = False):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        if ragged:
            out = model(torch.cat(seqs)[None], lengths=list(lengths))[0]
        else:
            out = torch.cat([model(s[None])[0] for s in seqs])
        (out * torch.cat(weights)).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    alone, g_alone = run(False)
    for checkpointing in (False, True):
        out, g = run(True, checkpointing)
        assert (out - alone).abs().max().item() < 1e-5
        for a, b in zip(g, g_alone):
            assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    model.activation_checkpointing = False
    row = torch.cat(seqs)[None]
    with pytest.raises(ValueError, match="sum\\(lengths\\) = 45"):
        model(row, lengths=[lengths[0] - 1, *lengths[1:]])  # one token short of the row
    with pytest.raises(ValueError, match="positive"):
        model(row, lengths=[0, *lengths])


@pytest.mark.parametrize("layout", ["batch", "packed-documents", "ragged"])
def test_keep_equals_the_full_forward_at_those_positions_with_gradients(layout):
    """`keep` (SFT's answer tokens, PPO's actions, a reward model's last tokens): the outputs and
    weight gradients are those of the full forward read at the kept positions, with checkpointing too."""
    model = tiny_model(**CONFIGS["gqa-untied"]).train()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 101, (2, 12), generator=g)
    kw = {"batch": {}, "packed-documents": {"doc_ids": torch.tensor([[0] * 5 + [1] * 7, [0] * 12])},
          "ragged": {"lengths": [5, 9, 10]}}[layout]
    if layout == "ragged":
        x = x.reshape(1, 24)
    keep = torch.tensor([0, 3, 4, 11, 12, 17, 23])
    weights = torch.randn(len(keep), 101, generator=g)

    def run(with_keep: bool, checkpointing: bool = False):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        out = model(x, keep=keep, **kw) if with_keep else model(x, **kw).flatten(0, 1)[keep]
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    full, g_full = run(False)
    for checkpointing in (False, True):
        out, grads = run(True, checkpointing)
        assert out.shape == (len(keep), 101)
        torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-5)
        for a, b in zip(grads, g_full):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    model.activation_checkpointing = False
    hidden = model(x, keep=keep, return_hidden=True, **kw)
    assert hidden.shape == (len(keep), 64)
    assert model(x, keep=keep[:0], **kw).shape == (0, 101)  # nothing kept: an empty batch of outputs
    with pytest.raises(ValueError, match="keep cannot"):
        model(torch.randint(0, 101, (2, 4)), keep=keep[:1], last_only=True)


def test_meta_device_build_and_assign():
    src = tiny_model(**CONFIGS["gqa-tied"])
    with torch.device("meta"):
        m = Transformer(src.args)
    assert m.tok_embeddings.weight.is_meta
    state = dict(src.state_dict())
    m.load_state_dict(state, assign=True)
    m.tie_weights()
    assert m.output.weight is m.tok_embeddings.weight
    x = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert torch.equal(m.eval()(x), src(x))


def test_activation_checkpointing_gives_same_gradients():
    model = tiny_model(**CONFIGS["gqa-untied"]).train()
    x = torch.randint(0, 101, (2, 16))

    def grads():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.activation_checkpointing = True
    ckpt = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))


@pytest.mark.parametrize("name", ["gqa-untied", "gqa-tied"])
def test_flops_per_token_matches_flop_counter(name, monkeypatch):
    """6N + 12·L·d·T equals what torch's FLOP counter sees in one forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(cpu_kernels, "ONEDNN_LINEAR", None)  # the counter knows aten's matmuls only
    model = tiny_model(**CONFIGS[name]).train()
    B, T = 2, 16
    tokens = torch.randint(0, 101, (B, T))
    # SDPA's math backend, whose matmuls the counter sees (it has no formula for the CPU flash kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).sum().backward()
    assert counter.get_total_flops() == model.args.flops_per_token(T) * B * T


def test_onednn_linear_forward_and_gradients_match_f_linear():
    if cpu_kernels.ONEDNN_LINEAR is None:
        pytest.skip("this torch build has no usable oneDNN linear")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g, requires_grad=True)  # (out, in)
    w_t = torch.randn(32, 48, generator=g)  # PackedModel's (in, out) storage
    for weight in (w, w_t.t().requires_grad_(True)):
        for batch, rows in ((1, 1), (2, 40)):  # one row (MKL), many rows (oneDNN)
            x = torch.randn(batch, rows, 64, generator=g)[..., ::2].requires_grad_(True)  # non-contiguous input
            up = torch.randn(batch, rows, 48, generator=g)
            outs, grads = [], []
            for fn in (linear, torch.nn.functional.linear):
                y = fn(x, weight)
                gx, gw = torch.autograd.grad(y, (x, weight), up.transpose(0, 1).contiguous().transpose(0, 1))
                outs.append(y)
                grads.append((gx, gw))
            assert (outs[0] - outs[1]).abs().max().item() < 1e-5
            assert (grads[0][0] - grads[1][0]).abs().max().item() < 1e-4
            assert (grads[0][1] - grads[1][1]).abs().max().item() < 1e-4
            assert outs[0].grad_fn.name().startswith("_OneDNNLinear") == (batch * rows >= cpu_kernels.ONEDNN_MIN_ROWS)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype, as for F.linear
        assert linear(torch.randn(40, 32), w).dtype == torch.bfloat16


def test_rms_norm_forward_and_gradients_match_the_reference():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    norm.weight.data = torch.rand(48, generator=g) + 0.5
    x = (torch.randn(3, 7, 48, generator=g) * 4)[..., :].requires_grad_(True)
    up = torch.randn(3, 7, 48, generator=g)
    y = norm(x)
    assert y.grad_fn.name().startswith("_RMSNormFP32")  # the written-out backward on CPU fp32
    gx, gw = torch.autograd.grad(y, (x, norm.weight), up)
    # Meta's formula, differentiated by autograd in float64
    x64, w64 = x.detach().double().requires_grad_(True), norm.weight.detach().double().requires_grad_(True)
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    rx, rw = torch.autograd.grad(ref, (x64, w64), up.double())
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx.double(), rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), rw, atol=1e-4, rtol=1e-5)
    # bf16 input keeps Meta's semantics: normalise in fp32, cast back, then the gain
    xb = x.detach().bfloat16()
    torch.testing.assert_close(norm(xb), (torch.nn.functional.rms_norm(xb.float(), (48,), eps=1e-5).bfloat16()
                                          * norm.weight), atol=0, rtol=0)
