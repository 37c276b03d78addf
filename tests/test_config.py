"""The run config: sections, one declaration per setting, strict types, the shipped configs."""

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import run_config

from keras_vae.config import SECTIONS, ModelConfig, RunConfig, commented_yaml, flag_table
from keras_vae.model_config import VAEConfig
from keras_vae.settings import ConfigError, validate


def test_config_file_with_flag_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "model:\n  latent_dim: 3\n  hidden_units: [16, 8]\n  beta: 0.5\n"
    )
    config = RunConfig.load(tmp_path / "run.yaml").replace({"model": {"beta": "2"}}, from_text=True)
    assert (config.model.latent_dim, config.model.hidden_units, config.model.beta) == (
        3,
        (16, 8),
        2.0,
    )
    (tmp_path / "run.json").write_text(json.dumps({"training": {"epochs": 7}}))
    assert RunConfig.load(tmp_path / "run.json").training.epochs == 7


@pytest.mark.parametrize(
    "values, message",
    [
        ({"latent_dim": "two"}, "config key 'latent_dim' must be of type int"),
        ({"likelihood": "poisson"}, "config key 'likelihood' must be one of"),
        ({"epochs": 0}, "config key 'epochs' must be >= 1"),
        ({"data": "mnist"}, "config key 'data' must be one of"),
        ({"lr_decay_epochs": [30, 20]}, "'lr_decay_epochs' must be increasing"),
        ({"lr_decay_epochs": [0]}, "'lr_decay_epochs' must be increasing"),
        ({"lr_decay_factor": 0}, "'lr_decay_factor' must be in"),
        ({"dropout": 1.0}, "'dropout' must be in \\[0, 1\\)"),
        (
            {"strategy": "mirrored", "steps_per_execution": 16},
            "'steps_per_execution' must be 1 with strategy 'mirrored'",
        ),
        ({"gradient_estimator": "vimco"}, "'gradient_estimator' must be one of"),
        ({"gradient_estimator": "dreg"}, "'gradient_estimator' 'dreg' estimates the IWAE"),
        ({"learning_rate": "inf"}, "'learning_rate' must be finite and > 0"),
        ({"kl_warmup_steps": -1}, "'kl_warmup_steps' must be >= 0"),
        ({"beta": "nan"}, "'beta' must be finite and >= 0"),
        ({"seed": None}, "'seed' must be an integer for a run"),
        ({"seed": -1}, "'seed' must be None or an integer in \\[0, 2\\*\\*32\\)"),
        ({"data": "npz:"}, "'data' must be one of"),
        # Values of another type are refused, not coerced.
        ({"epochs": True}, "'epochs' must be of type int; got True"),
        ({"epochs": 2.5}, "'epochs' must be of type int; got 2.5"),
        ({"plots": [1]}, "'plots' must be of type bool"),
        ({"hidden_units": "16"}, "'hidden_units' must be a list of integers"),
        (
            {"architecture": "made", "likelihood": "gaussian"},
            "'likelihood' must be 'bernoulli' for architecture 'made'",
        ),
    ],
)
def test_bad_settings_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        run_config(**values)


def test_sections_and_keys_are_checked():
    with pytest.raises(ConfigError, match="unknown config section 'optim'"):
        RunConfig().replace({"optim": {}})
    with pytest.raises(ConfigError, match="unknown config key 'lr' in section 'training'"):
        RunConfig().replace({"training": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="unknown config key 'epochs' in section 'model'"):
        RunConfig().replace({"model": {"epochs": 3}})
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        RunConfig().replace({"model": [1]})


def test_each_setting_is_declared_once_with_help():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(flag_table())
    for cls in SECTIONS.values():
        for field in dataclasses.fields(cls):
            assert field.metadata["help"], field.name
    # The model section is the model's own settings, not a copy of them.
    assert {f.name for f in dataclasses.fields(VAEConfig)} <= {
        f.name for f in dataclasses.fields(ModelConfig)
    }
    assert dataclasses.fields(ModelConfig)[0] is dataclasses.fields(VAEConfig)[0]


def test_the_model_config_validates_its_rules_once():
    with pytest.raises(ConfigError, match="it needs objective 'iwae'"):
        validate(VAEConfig(gradient_estimator="dreg"))
    assert validate(VAEConfig(gradient_estimator="dreg", objective="iwae")).num_samples == 1


def test_shipped_configs_are_valid_and_use_tfds_mnist():
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(configs) == 14
    for path in configs:
        config = RunConfig.load(path)
        assert config.data.data == "tfds:mnist", path
        offline = config.replace({"data": {"data": "npz:../shared/data/mnist.npz"}})
        assert offline.model == config.model


def test_the_settings_page_shows_what_keras_vae_config_prints():
    page = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    block = page.split("```yaml\n")[-1].split("```")[0]
    assert block == commented_yaml()
