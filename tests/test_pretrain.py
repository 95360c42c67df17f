"""The training engine and the pretraining recipe: schedule, optimizer groups, accumulation,
FSDP2 under torchrun, kill-and-resume, stored reference losses, and config errors."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llama2.config import ConfigError, load_config
from llama2.recipes.pretrain import PretrainConfig, main
from llama2.train import OptimConfig, build_optimizer, lr_at

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "assets" / "losses" / "pretrain_tiny.json"


def test_cosine_schedule_hand_computed():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup reaching the peak at step 3
    # cosine over the remaining 10 steps (4..13): 0.1 + 0.45 * (1 + cos(pi * k / 9))
    for k, s in enumerate(range(4, 14)):
        assert lrs[s] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * k / 9)))
    assert lrs[-1] == pytest.approx(0.1)  # 10% of the peak at the end (SPEC §4)
    const = OptimConfig(lr=2.0, schedule="constant", warmup_steps=0)
    assert [lr_at(s, const, 5) for s in range(5)] == [2.0] * 5
    rm = OptimConfig(lr=1.0, warmup_steps=5, warmup_ratio=0.03)  # reward models: 3%, at least 5 steps
    assert lr_at(0, rm, 100) == pytest.approx(1 / 5) and lr_at(0, rm, 1000) == pytest.approx(1 / 30)


def test_optimizer_groups_and_paper_settings():
    from llama2.model import ModelArgs, Transformer

    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=50, hidden_dim=64))
    opt = build_optimizer(m, OptimConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) == 2 * 7 + 2 and len(no_decay["params"]) == 2 * 2 + 1
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-5


WORDS = "anna bob carl dora emil fay gus hana ivo jon oakton riverby stonehill marsh pinegate".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small deterministic corpus, its tokenizer and token shards (shared by the tests below)."""
    from llama2.pretokenize import pretokenize
    from llama2.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("pretrain")
    rng = random.Random(0)
    with open(d / "corpus.jsonl", "w") as f:
        for _ in range(1500):
            n, t = rng.choice(WORDS[:10]), rng.choice(WORDS[10:])
            f.write(json.dumps({"text": f"{n} lives in {t}. {n} has {rng.randint(1, 9)} cats. "
                                        f"Q: where does {n} live? A: {t}."}) + "\n")
    train_sentencepiece([d / "corpus.jsonl"], d / "tok", vocab_size=320)
    pretokenize([d / "corpus.jsonl"], d / "tok", d / "tokens", workers=1)
    return d


def overrides(corpus, out, **kw):
    base = {"preset": "tiny", "out_dir": str(out), "data.tokenizer": str(corpus / "tok"),
            "data.dataset": str(corpus / "tokens"), "model.vocab_size": 320, "model.dim": 64, "model.n_heads": 4,
            "model.n_kv_heads": 2, "model.hidden_dim": 128, "model.n_layers": 2, "data.seq_len": 64,
            "batch_tokens": 512, "micro_batch_size": 8, "max_steps": 6, "optim.warmup_steps": 2, "optim.lr": 3e-3, "eval_every": 3,
            "eval_batches": 2, "ckpt_every": 3, "log_every": 1}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run's rows overwrite the earlier ones


def run_cli(args, env=None, torchrun=0):
    env = {**os.environ, "LLAMA2_NO_PROGRESS": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    cmd = [sys.executable, "-m", "llama2", "pretrain", *args]
    if torchrun:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "-m", "llama2",
               "pretrain", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_loss_falls_and_matches_stored_reference(corpus, tmp_path, monkeypatch, reference):
    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    main(load_config(PretrainConfig, None, overrides(corpus, tmp_path / "run", max_steps=16, ckpt_every=0)))
    got = losses(tmp_path / "run")
    assert got[16] < got[1] - 1.0  # it learns
    # Silent numerical changes show up here; regenerate deliberately with LLAMA2_UPDATE_REFERENCE=1.
    ref = {int(k): v for k, v in reference(REFERENCE, got).items()}
    assert sorted(ref) == list(range(1, 17))
    assert all(abs(got[s] - ref[s]) < 2e-3 for s in ref), {s: (got[s], ref[s]) for s in ref}
    final = tmp_path / "run" / "final"
    assert (final / "model.json").is_file() and (final / "tokenizer.model").is_file()
    # TensorBoard events (tensorboard is a test dependency): the same losses as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"loss", "lr", "tokens_per_s", "val_loss"} <= set(events.Tags()["scalars"])
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert tb.keys() == got.keys() and all(abs(tb[s] - got[s]) < 1e-5 for s in got)


def test_gradient_accumulation_equals_one_large_batch(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    main(load_config(PretrainConfig, None, overrides(corpus, tmp_path / "big", micro_batch_size=8, ckpt_every=0)))
    main(load_config(PretrainConfig, None, overrides(corpus, tmp_path / "acc", micro_batch_size=2, ckpt_every=0)))
    a, b = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "big" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "acc" / "final" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_killed_run_resumes_exactly(corpus, tmp_path):
    full = run_cli(overrides(corpus, tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    killed = run_cli(overrides(corpus, tmp_path / "killed"), env={"LLAMA2_KILL_AT_STEP": "5"})
    assert killed.returncode == -9  # SIGKILL after step 5; the last checkpoint is step 3
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step-00000003"]
    resumed = run_cli(overrides(corpus, tmp_path / "killed") + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")


def test_resume_without_a_checkpoint_is_one_clear_line(corpus, tmp_path, monkeypatch, capsys):
    from llama2.cli import main as llama2_main

    monkeypatch.setenv("LLAMA2_NO_PROGRESS", "1")
    assert llama2_main(["pretrain", *overrides(corpus, tmp_path / "fresh"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"llama2 pretrain: error: --resume: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}"
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()  # nothing was trained


@pytest.mark.slow
def test_torchrun_fsdp2_matches_single_process(corpus, tmp_path):
    one = run_cli(overrides(corpus, tmp_path / "one", micro_batch_size=8), env={"OMP_NUM_THREADS": "1"})  # as a rank
    assert one.returncode == 0, one.stderr
    two = run_cli(overrides(corpus, tmp_path / "two", micro_batch_size=4), torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    # a sharded FSDP checkpoint resumes too: kill rank processes after step 4, resume from step 3
    killed = run_cli(overrides(corpus, tmp_path / "two-k", micro_batch_size=4), env={"LLAMA2_KILL_AT_STEP": "4"},
                     torchrun=2)
    assert killed.returncode != 0
    resumed = run_cli(overrides(corpus, tmp_path / "two-k", micro_batch_size=4) + ["--resume"], torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = losses(tmp_path / "two-k")
    assert all(abs(a[s] - c[s]) <= 1e-5 for s in a)


def test_config_errors_are_clear(corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_config(PretrainConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="micro_batch_size: expected an integer, got 'many'"):
        load_config(PretrainConfig, None, ["micro_batch_size=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\ndata:\n  seq_len: 64\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.colour'"):
        load_config(PretrainConfig, bad)
    r = run_cli(overrides(corpus, tmp_path / "x", batch_tokens=500))
    assert r.returncode == 1 and "batch_tokens=500 is not a multiple" in r.stderr and "Traceback" not in r.stderr


def test_nan_loss_stops_with_clear_message(corpus, tmp_path):
    r = run_cli(overrides(corpus, tmp_path / "nan", **{"optim.lr": 1e6, "max_steps": 8, "optim.grad_clip": 0}))
    assert r.returncode == 1 and "is not finite" in r.stderr and "Last good checkpoint" in r.stderr


_FAULTS = """
import resource, sys, torch
from llama2.losses import lm_loss
from llama2.model import ModelArgs, Transformer
from llama2.train import OptimConfig, build_optimizer, keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "on" else False
torch.manual_seed(0)
m = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=4096, hidden_dim=768, max_seq_len=128))
m.init_weights()
opt = build_optimizer(m, OptimConfig())
x = torch.randint(0, 4096, (8, 129))
def step():
    lm_loss(m(x[:, :-1]), x[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.machine
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_keep_freed_memory_spares_page_faults():
    # Five training steps of a small model: by default glibc maps the large activations and
    # gradients afresh and the kernel faults their pages in (27,000-68,000 minor faults measured);
    # with the setting the freed blocks are reused (0-2,100). Fresh processes: the setting is global.
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.split()
        return out[0] == "True", int(out[1])

    took, with_setting = faults("on")
    _, without = faults("off")
    assert took  # glibc: the setting was applied
    if without < 10_000:  # the control: this machine's allocator/kernel does not fault them in anyway
        pytest.skip(f"only {without} minor faults without the setting: nothing for it to spare here")
    assert with_setting < without / 5, (with_setting, without)


def test_gpu_peak_flops_by_device_name(monkeypatch):
    """The MFU denominator on GPUs: the datasheet dense bf16 peak of the card the name identifies."""
    import torch

    from llama2.train import peak_flops

    cuda = torch.device("cuda", 0)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12),
                       ("Some Future GPU", 0.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(cuda, torch.bfloat16) == peak, name
        assert peak_flops(cuda, torch.float32) == peak / 2, name  # TF32 tensor cores: half the bf16 rate


def test_loss_scaler_rules():
    """float16's dynamic loss scaling: scale the loss, unscale the gradients, skip an overflowed step and
    halve, double after `growth_interval` clean steps; bf16/fp32: a pass-through."""
    import torch

    from llama2.train import LossScaler

    off = LossScaler(torch.bfloat16)
    assert not off.enabled and off.scaled(torch.tensor(2.0)).item() == 2.0 and off.state_dict() == {}
    lin = torch.nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    s = LossScaler(torch.float16, init_scale=8.0, growth_interval=2)
    loss = lin(torch.ones(1, 2)).sum()
    s.scaled(loss).backward()
    assert torch.equal(lin.weight.grad, torch.full((1, 2), 8.0))
    s.unscale_(lin)
    assert torch.equal(lin.weight.grad, torch.ones(1, 2))
    w = lin.weight.detach().clone()
    assert not s.step(float("inf"), opt) and torch.equal(lin.weight, w) and s.scale == 4.0  # skipped, halved
    assert s.step(1.0, opt) and torch.equal(lin.weight, w - 1) and s.scale == 4.0
    assert s.step(1.0, opt) and s.scale == 8.0 and s.clean_steps == 0  # two clean steps: doubled
    s.step(1.0, opt)
    t = LossScaler(torch.float16)
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.clean_steps) == (8.0, 1)


def test_float16_skips_overflowed_steps_and_resumes_exactly(corpus, tmp_path):
    """dtype float16 (autocast) with a loss scale too large to start with: the first steps overflow and
    are skipped while the scale halves, then training goes on; a killed run resumes with its scale."""
    kw = {"dtype": "float16", "max_steps": 8, "optim.loss_scale": 1e6}

    def rows(out):
        return {r["step"]: (r["loss"], r["loss_scale"], r["skipped"])
                for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    full = run_cli(overrides(corpus, tmp_path / "full", **kw))
    assert full.returncode == 0, full.stderr
    got = rows(tmp_path / "full")
    assert [got[s][2] for s in range(1, 9)] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert [got[s][1] for s in range(1, 9)] == [5e5, 2.5e5] + [2.5e5] * 6
    assert got[8][0] < got[3][0] - 0.3  # it learns once the scale fits
    killed = run_cli(overrides(corpus, tmp_path / "killed", **kw), env={"LLAMA2_KILL_AT_STEP": "5"})
    assert killed.returncode == -9
    resumed = run_cli(overrides(corpus, tmp_path / "killed", **kw) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert rows(tmp_path / "killed") == got


@pytest.mark.slow
def test_torchrun_float16_ranks_skip_the_same_steps(corpus, tmp_path):
    """Under FSDP2 the overflow decision is taken on the all-reduced gradient norm: two ranks skip the
    same steps as one process and keep the same scale (losses agree to fp16 rounding)."""
    kw = {"dtype": "float16", "optim.loss_scale": 1e6}
    one = run_cli(overrides(corpus, tmp_path / "one", micro_batch_size=8, **kw))
    assert one.returncode == 0, one.stderr
    two = run_cli(overrides(corpus, tmp_path / "two", micro_batch_size=4, **kw), torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["skipped"] for r in a] == [r["skipped"] for r in b] and sum(r["skipped"] for r in a) >= 1
    assert [r["loss_scale"] for r in a] == [r["loss_scale"] for r in b]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-3 for x, y in zip(a, b))
