"""Every YAML config in configs/ loads into its recipe's dataclass (no unknown keys, right types)."""
from pathlib import Path

import pytest

from llama2.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def recipe_configs():
    from llama2.recipes.context_distill import ContextDistillConfig
    from llama2.recipes.evaluate import EvaluateConfig
    from llama2.recipes.gatt import GattConfig
    from llama2.pipeline import PipelineConfig
    from llama2.recipes.ppo import PPOConfig
    from llama2.recipes.pretrain import PretrainConfig
    from llama2.recipes.rejection_sampling import RejectionSamplingConfig
    from llama2.recipes.reward_model import RewardConfig
    from llama2.recipes.sft import SFTConfig

    return {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig,
            "rlhf/rejection_sampling": RejectionSamplingConfig, "rlhf/ppo": PPOConfig, "rlhf/gatt": GattConfig,
            "rlhf/context_distill": ContextDistillConfig,
            "evaluate": EvaluateConfig, "pipeline": PipelineConfig}


def config_key(rel: Path) -> str:
    # configs/rlhf/ holds several recipes; the file name says which (rejection_sampling_tiny.yaml)
    return f"rlhf/{rel.stem.rsplit('_', 1)[0]}" if rel.parts[0] == "rlhf" else rel.parts[0]


FILES = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONFIGS)) for p in FILES])
def test_config_loads(path):
    table = recipe_configs()
    stage = config_key(path.relative_to(CONFIGS))
    assert stage in table, f"no recipe config class registered for configs/{stage}*"
    cfg = load_config(table[stage], path)
    assert isinstance(cfg, table[stage])
    # every setting the file writes is the one the recipe gets (none dropped, renamed or coerced away)
    import yaml

    from llama2.config import to_dict

    def same(written, got, where):
        if isinstance(written, dict) and isinstance(got, dict):
            for k, v in written.items():
                assert k in got, f"{where}{k}: not in the loaded config"
                same(v, got[k], f"{where}{k}.")
        else:
            assert got == written, f"{where.rstrip('.')}: the file says {written!r}, the recipe got {got!r}"

    written = yaml.safe_load(path.read_text()) or {}
    written.pop("base", None)  # a preset on top of another: its own settings win
    same(written, to_dict(cfg), "")


def test_a_config_on_a_base_says_only_what_it_changes(tmp_path):
    from llama2.config import ConfigError
    from llama2.pipeline import PipelineConfig

    (tmp_path / "a.yaml").write_text("versions: 2\nsft: {epochs: 3, seq_len: 256}\nprompts: [x, y]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nsft: {epochs: 1}\nprompts: [z]\nredteam: true\n")
    cfg = load_config(PipelineConfig, tmp_path / "sub" / "b.yaml", ["versions=3"])
    assert (cfg.versions, cfg.sft, cfg.prompts, cfg.redteam) == (3, {"epochs": 1, "seq_len": 256}, ["z"], True)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="a cycle"):
        load_config(PipelineConfig, tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml \\(the base of .*e.yaml\\)"):
        load_config(PipelineConfig, tmp_path / "e.yaml")
    (tmp_path / "f.yaml").write_text("base: a.yaml\nverions: 2\n")
    with pytest.raises(ConfigError, match="f.yaml: unknown key 'verions'"):
        load_config(PipelineConfig, tmp_path / "f.yaml")


def test_paper_hyperparameters_in_presets():
    from llama2.recipes.pretrain import PretrainConfig
    from llama2.recipes.sft import SFTConfig

    for size, lr in [("7B", 3e-4), ("13B", 3e-4), ("34B", 1.5e-4), ("70B", 1.5e-4)]:
        pt = load_config(PretrainConfig, CONFIGS / "pretrain" / f"{size}.yaml")
        assert pt.preset == size and pt.optim.lr == lr and pt.batch_tokens == 4 * 2**20
        assert (pt.optim.beta1, pt.optim.beta2, pt.optim.eps, pt.optim.weight_decay) == (0.9, 0.95, 1e-5, 0.1)
        assert pt.optim.warmup_steps == 2000 and pt.optim.min_lr_ratio == 0.1 and pt.data.seq_len == 4096
        sft = load_config(SFTConfig, CONFIGS / "sft" / f"{size}.yaml")
        assert (sft.optim.lr, sft.batch_size, sft.seq_len, sft.epochs) == (2e-5, 64, 4096, 2)


def test_pipeline_stage_settings_are_valid():
    """The pipeline's per-stage overrides are checked against each recipe's config."""
    from llama2.pipeline import PipelineConfig, check

    for path in sorted((CONFIGS / "pipeline").glob("*.yaml")):
        check(load_config(PipelineConfig, path))


def test_tiny_pretrain_preset_is_the_pipelines_pretraining_stage():
    """configs/pretrain/tiny.yaml runs the pretraining `make demo` runs (no drift between them)."""
    from llama2.config import from_dict
    from llama2.pipeline import PipelineConfig
    from llama2.recipes.pretrain import PretrainConfig

    tiny = load_config(PretrainConfig, CONFIGS / "pretrain" / "tiny.yaml")
    stage = from_dict(PretrainConfig, load_config(PipelineConfig, CONFIGS / "pipeline" / "tiny.yaml").pretrain)
    assert tiny.preset == "tiny" and tiny.data.corpus == ["builtin"]
    assert {**vars(tiny), "out_dir": ""} == {**vars(stage), "out_dir": ""}
