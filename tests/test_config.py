"""Config: YAML + dotted overrides, and errors that name the key before any work starts."""

import subprocess
from pathlib import Path

import pytest

from vistrain.config import ConfigError, load_config
from vistrain.engine.config_sections import gradient_accumulation
from vistrain.tasks.gan import GanConfig

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "gan" / "digits.yaml"


def test_digits_config_loads_typed_with_overrides():
    cfg = load_config(DIGITS, ["train.max_steps=7", "gan.loss=non_saturating", "run.seed=random"])
    assert isinstance(cfg, GanConfig)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.gan.loss == "non_saturating"
    assert cfg.run.seed == "random"
    assert cfg.optim.g.betas == [0.0, 0.99]


def test_a_map_given_whole_replaces_the_tasks_default(tmp_path):
    # The VLM task's default lr_mult trains vision and LM at 1/100 of the projector's lr; a YAML or override
    # that gives the map whole means exactly that map (merged key by key, `{}` kept every default).
    vlm = Path(__file__).resolve().parents[1] / "configs" / "vlm"
    assert load_config(vlm / "nanovlm_222m.yaml").optim.lr_mult == {"vision": 0.009765625, "lm": 0.009765625}
    (tmp_path / "none.yaml").write_text("task: vlm\noptim: {lr_mult: {}}\n")
    assert load_config(tmp_path / "none.yaml").optim.lr_mult == {}
    (tmp_path / "one.yaml").write_text("task: vlm\noptim: {lr_mult: {lm: 0.5}}\n")
    assert load_config(tmp_path / "one.yaml").optim.lr_mult == {"lm": 0.5}
    assert load_config(vlm / "nanovlm_222m.yaml", ["optim.lr_mult={}"]).optim.lr_mult == {}
    # a dotted key sets one entry and keeps the others
    one = load_config(vlm / "nanovlm_222m.yaml", ["optim.lr_mult.vision=0"]).optim.lr_mult
    assert one == {"vision": 0.0, "lm": 0.009765625}


def test_typo_in_override_names_key_and_closest():
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, ["train.max_step=5"])
    assert "train.max_step" in str(e.value) and "train.max_steps" in str(e.value)


def test_typo_in_yaml_section_names_key_and_closest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS.read_text().replace("train:", "trian:"))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "'trian'" in str(e.value) and "train" in str(e.value) and str(bad) in str(e.value)


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, ["train.max_steps=abc"])
    msg = str(e.value)
    assert "train.max_steps" in msg and "'abc'" in msg and "int" in msg


@pytest.mark.parametrize("override, needle", [
    ("run.seed=1.5", "run.seed"),
    ("train.precision=fp8", "train.precision"),
    ("run.loggers=[console,tensorbord]", "tensorbord"),
    ("task=vae", "built-in tasks"),
    ("train.max_steps", "key=value"),
])
def test_invalid_values_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(DIGITS, [override])


def test_gradient_accumulation_is_derived_and_must_be_whole():
    assert gradient_accumulation(64, 8, 2) == 4
    assert gradient_accumulation(64, 0, 2) == 1
    with pytest.raises(ConfigError, match="micro_batch_size"):
        gradient_accumulation(64, 7, 2)


def test_cli_typo_fails_fast_and_touches_nothing(tmp_path, subprocess_env, vistrain_cmd):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"precious")
    (run / "config.yaml").write_text("old: config\n")
    result = subprocess.run(vistrain_cmd + ["train", str(DIGITS), f"run.out_dir={run}", "train.bach_size=8"],
                            capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert result.returncode == 2
    assert "train.bach_size" in result.stderr and "train.batch_size" in result.stderr
    assert (ckpt / "model.safetensors").read_bytes() == b"precious"
    assert (run / "config.yaml").read_text() == "old: config\n"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]
