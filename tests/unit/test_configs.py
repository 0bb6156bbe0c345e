"""Config system: every shipped YAML loads; overrides, bases and errors behave."""

from pathlib import Path

import pytest
import yaml

from distill_core.config import (CONFIG_DIR, ConfigError, apply_overrides, build, describe, load_config,
                                 load_yaml, resolve_preset)
from distill_core.model.config import ModelConfig
from distill_core.prepare import PrepareConfig
from student_trainer.config import TrainConfig


def _config_class(path: Path):
  """Which schema a shipped YAML file belongs to."""
  if path.parent.name == "models":
    return ModelConfig
  if path.name.startswith("prepare"):
    return PrepareConfig
  if path.name.startswith("teacher_server"):
    from teacher_server.config import ServerConfig
    return ServerConfig
  if path.name.startswith("dump"):
    from teacher_server.dump_config import DumpConfig
    return DumpConfig
  return TrainConfig


SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIG_DIR)) for p in SHIPPED])
def test_every_shipped_yaml_loads(path):
  cls = _config_class(path)
  if cls is ModelConfig:
    cfg = build(ModelConfig, resolve_preset(str(path)))
  else:
    cfg = load_config(cls, path)
  assert isinstance(cfg, cls)


def test_there_are_shipped_configs_of_each_kind():
  kinds = {_config_class(p) for p in SHIPPED}
  assert {ModelConfig, PrepareConfig, TrainConfig} <= kinds


def test_overrides_are_typed_and_nested():
  data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "d=null", "e=1e-3", "f=text"])
  assert data == {"a": {"b": 2, "c": [1, 2]}, "d": None, "e": 1e-3, "f": "text"}


def test_override_of_a_preset_field_keeps_the_preset():
  cfg = load_config(TrainConfig, None, ["model=tiny", "model.hidden_size=64", "data.path=x"])
  assert cfg.model.hidden_size == 64 and cfg.model.num_hidden_layers == 2


def test_unknown_key_is_named():
  with pytest.raises(ConfigError, match=r"optim\.learnin_rate: unknown key"):
    load_config(TrainConfig, None, ["optim.learnin_rate=1"])


def test_unknown_key_blames_the_override_or_the_file_and_suggests_close_keys(tmp_path):
  with pytest.raises(ConfigError) as e:
    load_config(TrainConfig, "configs/tiny_ce.yaml", ["optim.learnig_rate=1e-3"])
  assert str(e.value) == ("invalid configuration (configs/tiny_ce.yaml + overrides): optim.learnig_rate: unknown key "
                          "(from the override optim.learnig_rate=...); did you mean optim.learning_rate?")
  path = tmp_path / "run.yaml"
  path.write_text("optim:\n  learnig_rate: 0.001\nstep: 3\n")
  with pytest.raises(ConfigError) as e:
    load_config(TrainConfig, path, ["steps=4"])
  lines = str(e.value).splitlines()
  assert lines[0] == f"invalid configuration ({path} + overrides):"
  assert f"  optim.learnig_rate: unknown key (from {path}); did you mean optim.learning_rate?" in lines
  assert any(line.startswith("  step: unknown key") and "did you mean steps?" in line for line in lines)
  with pytest.raises(ConfigError, match=r"teacher\.local\.model\.vocab_sise: unknown key \(from the override "
                                        r"teacher\.local\.model\.vocab_sise=\.\.\.\); did you mean "
                                        r"teacher\.local\.model\.vocab_size"):
    load_config(TrainConfig, None, ["teacher.source=local", "teacher.local.model=tiny",
                                    "teacher.local.model.vocab_sise=9"])
  with pytest.raises(ConfigError, match=r"^invalid configuration \(defaults \+ overrides\): zzz: unknown key "
                                        r"\(from the override zzz=\.\.\.\)$"):  # nothing close: no suggestion
    load_config(TrainConfig, None, ["zzz=1"])


def test_wrong_type_is_named():
  with pytest.raises(ConfigError, match=r"steps: .*integer"):
    load_config(TrainConfig, None, ["steps=many"])


def test_bad_override_syntax():
  with pytest.raises(ConfigError, match="key=value"):
    load_config(TrainConfig, None, ["steps"])


def test_base_chain_and_cycle(tmp_path):
  (tmp_path / "a.yaml").write_text(yaml.safe_dump({"x": 1, "y": {"p": 1, "q": 2}}))
  (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml", "y": {"q": 3}}))
  assert load_yaml(tmp_path / "b.yaml") == {"x": 1, "y": {"p": 1, "q": 3}}
  (tmp_path / "c.yaml").write_text("base: d.yaml\n")
  (tmp_path / "d.yaml").write_text("base: c.yaml\n")
  with pytest.raises(ConfigError, match="circular"):
    load_yaml(tmp_path / "c.yaml")


def test_unknown_preset_lists_known():
  with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny"):
    resolve_preset("nope")


def test_describe_covers_every_field():
  lines = describe(TrainConfig)
  assert any(line.startswith("optim.learning_rate (float, default 0.003)") for line in lines)
  assert any(line.startswith("loss.kd_mode (one of tail|renormalize|topk|sampled|reverse_kl|gkd, default 'tail')") for line in lines)
  assert any(line.startswith("loss.temperature.start (float, default 1.0)") for line in lines)  # parent's default
  assert any(line.startswith("model.hidden_size (int, default 32)") for line in lines)  # the default preset's
  assert any(line.startswith("data.path (str, default ") for line in lines)
  assert any(line.startswith("loss.kd_mode") for line in lines)
  assert all(": " in line or line.endswith(":") for line in lines)


def test_validation_errors_never_show_secrets_sections_or_long_values():
  """Config errors name the key; they show a short value, and never a token or a whole section."""
  from student_trainer.config import TrainConfig
  with pytest.raises(ConfigError) as e:
    load_config(TrainConfig, None, ["data.path=x", "teacher.remote.token=abc", "teacher.remote.token_file=f"])
  assert "abc" not in str(e.value) and "teacher.remote" in str(e.value)
  with pytest.raises(ConfigError) as e:
    load_config(TrainConfig, None, ["data.path=x", "teacher.remote.window=" + "x" * 5000])
  assert "teacher.remote.window" in str(e.value) and len(str(e.value)) < 600
