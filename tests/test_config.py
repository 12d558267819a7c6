"""Config assembly and validation: unknown keys, unknown registry names, wrong types."""

import time

import pytest
from omegaconf import OmegaConf

from videollm.config import RunConfig, load_config, parse_options, save_config, validate_mapping
from videollm.errors import ConfigError, RegistryError, VideoLLMError


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


BASE = """
model:
  arch: video_llama
  model_type: tiny
  max_txt_len: 16
run:
  init_lr: 1.0e-4
  max_epoch: 1
"""


def test_model_defaults_are_merged_under_user_values(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.model.max_txt_len == 16  # user value wins
    assert cfg.model.num_video_query_token == 8  # from the tiny preset
    assert cfg.run.batch_size_train == RunConfig.batch_size_train  # run defaults filled


def test_options_override_and_effective_config_is_saved(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["model.max_txt_len=20", "run.init_lr=0.5"])
    assert cfg.model.max_txt_len == 20 and cfg.run.init_lr == 0.5
    path = save_config(cfg, tmp_path / "out")
    assert OmegaConf.load(path).model.max_txt_len == 20


def test_options_as_key_value_pairs():
    assert parse_options(["run.seed", "3"]).run.seed == 3


@pytest.mark.parametrize(
    "text, key, hint",
    [
        (BASE.replace("max_txt_len: 16", "max_text_len: 16"), "model.max_text_len", "max_txt_len"),
        (BASE.replace("max_txt_len: 16", "num_query_tokens: 8"), "model.num_query_tokens", "num_query_token"),
        (BASE.replace("init_lr: 1.0e-4", "init_rl: 1.0e-4"), "run.init_rl", "init_lr"),
    ],
)
def test_misspelled_key_is_named_with_a_suggestion(tmp_path, text, key, hint):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert time.perf_counter() - start < 1.0
    assert key in str(err.value) and f"did you mean {hint}?" in str(err.value)


def test_misspelled_option_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"run.max_epochs: unknown key \(did you mean max_epoch\?\)"):
        load_config(write(tmp_path, BASE), ["run.max_epochs=3"])


@pytest.mark.parametrize(
    "text, key",
    [
        (BASE.replace("max_txt_len: 16", "max_txt_len: sixteen"), "model.max_txt_len"),
        (BASE.replace("max_epoch: 1", "max_epoch: 1.5"), "run.max_epoch"),
        (BASE.replace("max_txt_len: 16", "freeze_vit: maybe"), "model.freeze_vit"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, text, key):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, text))
    assert time.perf_counter() - start < 1.0


def test_unknown_registry_name_lists_registered_names(tmp_path):
    start = time.perf_counter()
    with pytest.raises(RegistryError) as err:
        load_config(write(tmp_path, BASE.replace("arch: video_llama", "arch: video_lama")))
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "unknown model 'video_lama'" in msg and "did you mean video_llama?" in msg
    assert "registered models: " in msg and "video_llama" in msg.split("registered models: ")[1]


def test_unknown_preset_and_root(tmp_path):
    with pytest.raises(ConfigError, match="model.model_type: unknown preset 'tinny'.*did you mean tiny"):
        load_config(write(tmp_path, BASE.replace("model_type: tiny", "model_type: tinny")))
    with pytest.raises(ConfigError, match="runn: unknown root"):
        load_config(write(tmp_path, BASE + "runn: {}\n"))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_nested_schema_validation():
    from dataclasses import dataclass, field
    from typing import List, Optional

    @dataclass
    class Inner:
        size: int = 1

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        names: List[str] = field(default_factory=list)
        maybe: Optional[float] = None

    validate_mapping({"inner": {"size": 3}, "names": ["a"], "maybe": None}, Outer, "x")
    with pytest.raises(ConfigError, match=r"x.inner.sise: unknown key \(did you mean size\?\)"):
        validate_mapping({"inner": {"sise": 3}}, Outer, "x")
    with pytest.raises(ConfigError, match=r"x.names\[1\]"):
        validate_mapping({"names": ["a", 2]}, Outer, "x")


def test_every_error_derives_from_videollm_error():
    import videollm.errors as errors

    classes = [getattr(errors, n) for n in dir(errors) if n.endswith("Error")]
    assert len(classes) >= 8
    assert all(issubclass(c, VideoLLMError) for c in classes)
