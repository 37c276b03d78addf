"""The keras-vae command: flags generated from the settings, cheap --help, and one-line
errors with exit code 2."""

import subprocess
import sys
import time

import yaml

from keras_vae import config as run_config_module
from keras_vae.cli import build_parser, main
from keras_vae.config import RunConfig


def test_every_setting_is_a_flag_with_its_help_and_choices():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in run_config_module.flag_table():
        assert f"--{flag}" in help_text, flag
    assert "{mlp,gated_mlp,conv,made,pixelcnn_made}" in help_text
    assert "{elbo,iwae}" in help_text
    assert "d, the size of z" in help_text


def test_help_imports_no_tensorflow_and_answers_fast():
    script = (
        "import sys, time; t = time.perf_counter(); "
        "from keras_vae.cli import build_parser; build_parser().format_help(); "
        "print(time.perf_counter() - t); "
        "print(any(m.split('.')[0] in ('tensorflow', 'keras', 'tensorflow_probability') "
        "for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[1] == "False", out
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "keras_vae.cli", "train", "--help"], check=True, capture_output=True
    )
    assert time.perf_counter() - started < 10  # loose: a TensorFlow import alone takes ~5 s


def test_config_command_prints_every_default_as_yaml(capsys):
    assert main(["config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert RunConfig().replace(printed) == RunConfig()
    assert printed == RunConfig().to_dict()


def test_flags_override_the_config_file(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("model:\n  latent_dim: 3\ntraining:\n  epochs: 3\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--epochs", "0"]) == 2
    assert "config key 'epochs' must be >= 1; got 0" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--epochs", "x"]) == 2
    assert "config key 'epochs' must be of type int; got 'x'" in capsys.readouterr().err


def test_cli_reports_bad_config_and_missing_files(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model:\n  latent_dim: 3\n  width: 10\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown config key 'width'" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["train", "--config", str(tmp_path / "broken.json")]) == 2
    assert "not valid JSON/YAML" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data",
                f"npz:{tmp_path / 'none.npz'}",
                "--runs-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 2
    )
    assert "npz data file not found" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "no run directory or .keras model" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "cannot resume" in capsys.readouterr().err
