"""Training runs as a user starts them: the CLI, run directories, resume, configs."""

import csv
import json

import keras
import numpy as np
import pytest
from helpers import run_config

from keras_vae import data as datasets
from keras_vae.cli import main
from keras_vae.config import ConfigError, RunConfig
from keras_vae.run import train
from keras_vae.rundir import checkpoint_state

FAST = ["--hidden-units", "32", "--latent-dim", "2", "--batch-size", "128", "--quiet"]


def test_cli_train_on_digits_writes_every_artefact(tmp_path, capsys):
    runs, exports = tmp_path / "runs", tmp_path / "saved_models"
    code = main(
        ["train", "--epochs", "2", "--runs-dir", str(runs), "--export-dir", str(exports), *FAST]
    )
    assert code == 0
    (run_dir,) = runs.iterdir()
    for name in (
        "config.json",
        "history.csv",
        "metrics.json",
        "export.json",
        "checkpoints/best.keras",
        "checkpoints/last.keras",
    ):
        assert (run_dir / name).is_file(), name
    for plot in (
        "loss_curves",
        "reconstructions",
        "samples",
        "latent",
        "manifold",
        "traversals",
        "interpolations",
    ):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000, plot
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert {"loss", "reconstruction_loss", "kl_loss", "elbo", "val_elbo"} <= set(rows[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert metrics["num_examples"] == 360 and metrics["elbo"]["mean"] < 0
    # The test set is saved as scored, and `evaluate RUN` scores that very file.
    x_test, y_test = datasets.load_test_set(run_dir / "test_set.npz")
    data = datasets.load("digits")
    np.testing.assert_array_equal(x_test, datasets.binarize_once(data.x_test))
    np.testing.assert_array_equal(y_test, data.y_test)
    assert metrics["test_set_sha256"] == datasets.fingerprint(x_test)
    datasets.save_test_set(run_dir / "test_set.npz", x_test[:50])
    assert (
        main(["evaluate", str(run_dir), "--k", "2", "--output", str(tmp_path / "report.json")]) == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_examples"] == 50
    assert report["test_set_sha256"] == datasets.fingerprint(x_test[:50])
    saved = json.loads((run_dir / "export.json").read_text())["saved_model"]
    assert saved.endswith("saved_models/vae/1")
    assert (exports / "vae" / "1" / "saved_model.pb").is_file()
    # The saved config rebuilds the run.
    config = RunConfig.load(run_dir / "config.json")
    assert (
        config.training.epochs == 2
        and config.model.hidden_units == (32,)
        and config.model.latent_dim == 2
    )
    assert "test ELBO" in capsys.readouterr().out

    # The other commands work on the run directory.
    assert (
        main(
            ["sample", str(run_dir), "--n", "8", "--seed", "3", "--output", str(tmp_path / "s.npy")]
        )
        == 0
    )
    model = keras.saving.load_model(run_dir / "checkpoints" / "best.keras")
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), model.sample(8, seed=3).numpy())
    assert main(["sample", str(run_dir), "--output", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert main(["export", str(run_dir), "--name", "again", "--export-dir", str(exports)]) == 0
    assert (exports / "again" / "1" / "saved_model.pb").is_file()


class Interrupt(Exception):
    pass


class KillInEpoch(keras.callbacks.Callback):
    """Stops training in the middle of an epoch, as a killed process would."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batch:
            raise Interrupt()


@pytest.mark.slow
def test_resume_after_a_kill_continues_at_the_right_epoch_with_the_same_results(tmp_path):
    # With dropout: its masks, like the sampling noise, continue where they stopped.
    config = run_config(
        epochs=4,
        hidden_units=(32,),
        latent_dim=4,
        batch_size=128,
        dropout=0.2,
        runs_dir=str(tmp_path),
        export_dir=str(tmp_path / "sm"),
        plots=False,
    )
    whole = train(config, run_dir=tmp_path / "whole", verbose=0)
    with pytest.raises(Interrupt):
        train(config, run_dir=tmp_path / "killed", callbacks=[KillInEpoch(2, 5)], verbose=0)
    with open(tmp_path / "killed" / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # epochs 0 and 1 completed
    code = main(["train", "--resume", str(tmp_path / "killed"), "--quiet"])
    assert code == 0
    resumed = keras.saving.load_model(tmp_path / "killed" / "checkpoints" / "last.keras")
    # 1437 digits less 10% for validation, in batches of 128: 11 steps an epoch
    assert int(resumed.optimizer.iterations.numpy()) == 4 * 11
    assert (
        checkpoint_state(tmp_path / "killed" / "checkpoints" / "last.keras")["epochs_completed"]
        == 4
    )
    for a, b in zip(whole.model.weights, resumed.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    with open(tmp_path / "whole" / "history.csv") as f:
        expected = list(csv.DictReader(f))
    with open(tmp_path / "killed" / "history.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["epoch"] for r in got] == ["0", "1", "2", "3"]
    np.testing.assert_allclose(
        [float(r["val_elbo"]) for r in got], [float(r["val_elbo"]) for r in expected], rtol=1e-5
    )
    # Killed in its first epoch, before any checkpoint: resuming starts it from the beginning.
    with pytest.raises(Interrupt):
        train(config, run_dir=tmp_path / "early", callbacks=[KillInEpoch(0, 5)], verbose=0)
    assert not (tmp_path / "early" / "checkpoints" / "last.keras").exists()
    assert main(["train", "--resume", str(tmp_path / "early"), "--quiet"]) == 0
    restarted = keras.saving.load_model(tmp_path / "early" / "checkpoints" / "last.keras")
    for a, b in zip(whole.model.weights, restarted.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_steps_per_execution_must_divide_the_epoch(tmp_path):
    # digits: 1437 training images in batches of 100 are 15 steps an epoch.
    values = {
        "data": "digits",
        "validation_fraction": 0,
        "batch_size": 100,
        "epochs": 2,
        "latent_dim": 2,
        "hidden_units": (16,),
        "plots": False,
        "export_dir": str(tmp_path / "saved_models"),
    }
    with pytest.raises(
        ConfigError,
        match=r"divide the 15 steps of an epoch, or Keras runs "
        r"16 steps an epoch; got 4 .*divisor below it is 3",
    ):
        train(run_config(**values, steps_per_execution=4), tmp_path / "refused", verbose=0)
    assert not (tmp_path / "refused").exists()
    result = train(run_config(**values, steps_per_execution=5), tmp_path / "run", verbose=0)
    assert int(result.model.optimizer.iterations.numpy()) == 2 * 15


def test_npz_data_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
        x_test=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8),
    )
    code = main(
        [
            "train",
            "--data",
            f"npz:{tmp_path / 'd.npz'}",
            "--epochs",
            "1",
            "--likelihood",
            "gaussian",
            "--learn-sigma",
            "shared",
            "--validation-fraction",
            "0",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--export-dir",
            str(tmp_path / "sm"),
            *FAST,
        ]
    )
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["num_examples"] == 16 and metrics["checkpoint"] == "last.keras"
    assert (run_dir / "plots" / "loss_curves.png").is_file()  # no validation curves to draw


class PoisonWeights(keras.callbacks.Callback):
    """Turns the weights into NaN at the start of an epoch: the loss diverges."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            kernel = self.model.decoder.layers[-2].kernel
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def test_a_diverged_run_stops_keeps_its_last_good_checkpoint_and_exports_nothing(tmp_path):
    config = run_config(
        epochs=3,
        hidden_units=(16,),
        latent_dim=2,
        batch_size=128,
        plots=False,
        export_dir=str(tmp_path / "sm"),
    )
    with pytest.raises(RuntimeError, match="NaN"):
        train(config, run_dir=tmp_path / "run", callbacks=[PoisonWeights(1)], verbose=0)
    last = tmp_path / "run" / "checkpoints" / "last.keras"
    assert checkpoint_state(last)["epochs_completed"] == 1
    model = keras.saving.load_model(last)
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    assert not (tmp_path / "sm").exists()


def test_bad_data_is_refused_before_training_even_with_xla(tmp_path, capsys):
    x = np.random.default_rng(0).uniform(size=(64, 8, 8)).astype("float32")
    x[3, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x, x_test=x[:8])
    assert (
        main(
            [
                "train",
                "--data",
                f"npz:{tmp_path / 'nan.npz'}",
                "--jit-compile",
                "true",
                "--run-dir",
                str(tmp_path / "run"),
                *FAST,
            ]
        )
        == 2
    )
    assert "the data contains NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_mismatched_or_empty_data_is_refused_before_training(tmp_path, capsys):
    x = np.random.default_rng(0).uniform(size=(64, 8, 8)).astype("float32")
    cases = [
        (
            {"x_train": x, "x_test": x[:8, :6, :6]},
            "expects inputs of shape (batch,) + (8, 8, 1); got shape (8, 6, 6, 1)",
        ),
        ({"x_train": x[:0], "x_test": x[:8]}, "leaves 0 training and 8 test examples"),
    ]
    for i, (arrays, message) in enumerate(cases):
        np.savez(tmp_path / "d.npz", **arrays)
        assert (
            main(
                [
                    "train",
                    "--data",
                    f"npz:{tmp_path / 'd.npz'}",
                    "--run-dir",
                    str(tmp_path / f"run{i}"),
                    *FAST,
                ]
            )
            == 2
        )
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"run{i}" / "history.csv").exists()


def test_flat_data_trains_plots_and_samples(tmp_path, capsys):
    x = np.random.default_rng(0).uniform(size=(64, 20)).astype("float32")
    np.savez(tmp_path / "flat.npz", x_train=x, x_test=x[:16])
    assert (
        main(
            [
                "train",
                "--data",
                f"npz:{tmp_path / 'flat.npz'}",
                "--epochs",
                "1",
                "--run-dir",
                str(tmp_path / "run"),
                "--export-dir",
                str(tmp_path / "sm"),
                *FAST,
            ]
        )
        == 0
    )
    # The figures of images are left out for data that are not images.
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == [
        "latent.png",
        "loss_curves.png",
    ]
    assert (
        main(["sample", str(tmp_path / "run"), "--n", "3", "--output", str(tmp_path / "s.npy")])
        == 0
    )
    assert np.load(tmp_path / "s.npy").shape == (3, 20)
    # The run's own saved test set of flat data is scored.
    assert main(["evaluate", str(tmp_path / "run"), "--k", "2"]) == 0
    assert '"num_examples": 16' in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "run"), "--output", str(tmp_path / "s.png")]) == 2
    assert "cannot draw data of shape (20,) as images" in capsys.readouterr().err


def test_resume_names_a_checkpoint_it_cannot_continue(tmp_path, capsys):
    config = run_config(
        epochs=1,
        hidden_units=(16,),
        latent_dim=2,
        batch_size=256,
        plots=False,
        export_dir=str(tmp_path / "sm"),
    )
    result = train(config, run_dir=tmp_path / "run", verbose=0)
    last = tmp_path / "run" / "checkpoints" / "last.keras"
    result.model.save(last)  # a plain Keras save: no training state
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 2
    assert (
        "last.keras is not a keras-vae checkpoint: it has no keras_vae_state.json"
        in capsys.readouterr().err
    )
    last.write_bytes(b"junk")
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 2
    assert "last.keras is not a keras-vae checkpoint: not a zip archive" in capsys.readouterr().err
    # Without its checkpoint, a run that has trained is not restarted over its history.
    last.unlink()
    history = (tmp_path / "run" / "history.csv").read_text()
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 2
    assert (
        "it has trained (history.csv, metrics.json or best.keras), but there is no "
        "checkpoint" in capsys.readouterr().err
    )
    assert (tmp_path / "run" / "history.csv").read_text() == history


def test_resume_refuses_changed_settings(tmp_path, capsys):
    config = run_config(
        epochs=1,
        hidden_units=(16,),
        latent_dim=2,
        batch_size=256,
        plots=False,
        export_dir=str(tmp_path / "sm"),
    )
    train(config, run_dir=tmp_path / "run", verbose=0)
    assert main(["train", "--resume", str(tmp_path / "run"), "--latent-dim", "4"]) == 2
    assert (
        "only epochs, early_stopping_patience, lr_decay_epochs, lr_decay_factor, plots, "
        "export_dir, export_name may change (early_stopping_patience only lengthened; got "
        "latent_dim: 2 -> 4)"
    ) in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--config", "c.yaml"]) == 2
    assert "leave out --config" in capsys.readouterr().err
    # The library's train() checks the same: the data order depends on the batch size.
    with pytest.raises(ConfigError, match=r"got batch_size: 256 -> 128\)"):
        train(config.replace({"training": {"batch_size": 128}}), tmp_path / "run", resume=True)
    assert RunConfig.load(tmp_path / "run" / "config.json") == config
    # What is written after training may change: plots, and where the export goes.
    assert (
        main(
            [
                "train",
                "--resume",
                str(tmp_path / "run"),
                "--epochs",
                "2",
                "--plots",
                "true",
                "--export-name",
                "other",
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "run" / "plots" / "samples.png").is_file()
    assert (tmp_path / "sm" / "other" / "1" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_a_resumed_run_stops_early_where_the_uninterrupted_run_stops(tmp_path):
    config = run_config(
        epochs=40,
        hidden_units=(16,),
        latent_dim=2,
        batch_size=128,
        learning_rate=0.03,
        early_stopping_patience=2,
        plots=False,
        export_dir=str(tmp_path / "sm"),
    )
    whole = train(config, run_dir=tmp_path / "whole", verbose=0)
    stopped = whole.metrics["epochs_completed"]
    state = checkpoint_state(tmp_path / "whole" / "checkpoints" / "last.keras")
    assert stopped < config.training.epochs and stopped - state["best_epoch"] == 2
    # Killed in its last epoch: the epoch before it did not improve either.
    with pytest.raises(Interrupt):
        train(
            config, run_dir=tmp_path / "killed", callbacks=[KillInEpoch(stopped - 1, 3)], verbose=0
        )
    assert (
        train(config, tmp_path / "killed", resume=True, verbose=0).metrics["epochs_completed"]
        == stopped
    )
    want = keras.saving.load_model(tmp_path / "whole" / "checkpoints" / "last.keras")
    got = keras.saving.load_model(tmp_path / "killed" / "checkpoints" / "last.keras")
    for a, b in zip(want.weights, got.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    # A run that stopped early trains no further when resumed.
    assert (
        train(config, tmp_path / "whole", resume=True, verbose=0).metrics["epochs_completed"]
        == stopped
    )
    last = keras.saving.load_model(tmp_path / "whole" / "checkpoints" / "last.keras")
    assert int(last.optimizer.iterations.numpy()) == int(want.optimizer.iterations.numpy())
    # A shorter patience might have stopped it sooner; a longer one continues it.
    with pytest.raises(ConfigError, match="not shorten it: 2 -> 1"):
        train(
            config.replace({"training": {"early_stopping_patience": 1}}),
            tmp_path / "whole",
            resume=True,
        )
    for patience, epochs in ((3, stopped + 1), (0, stopped + 2)):
        longer = config.replace(
            {"training": {"early_stopping_patience": patience, "epochs": epochs}}
        )
        resumed = train(longer, tmp_path / "whole", resume=True, verbose=0)
        assert resumed.metrics["epochs_completed"] == epochs
        assert RunConfig.load(tmp_path / "whole" / "config.json") == longer


def _learning_rates(run_dir):
    with open(run_dir / "history.csv") as f:
        return [float(row["learning_rate"]) for row in csv.DictReader(f)]


def test_learning_rate_decay_and_extending_it_on_resume(tmp_path, capsys):
    config = run_config(
        epochs=3,
        hidden_units=(16,),
        latent_dim=2,
        batch_size=256,
        lr_decay_epochs=(1, 2),
        lr_decay_factor=0.5,
        export_dir=str(tmp_path),
        plots=False,
    )
    assert [config.training.learning_rate_at(e) for e in range(4)] == [1e-3, 5e-4, 2.5e-4, 2.5e-4]
    run = tmp_path / "run"
    train(config, run_dir=run, verbose=0)
    np.testing.assert_allclose(_learning_rates(run), [1e-3, 5e-4, 2.5e-4], rtol=1e-6)
    # A resumed run may add drops in the epochs it has not trained yet...
    assert (
        main(
            [
                "train",
                "--resume",
                str(run),
                "--epochs",
                "5",
                "--lr-decay-epochs",
                "1,2,4",
                "--quiet",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(
        _learning_rates(run), [1e-3, 5e-4, 2.5e-4, 2.5e-4, 1.25e-4], rtol=1e-6
    )
    model = keras.saving.load_model(run / "checkpoints" / "last.keras")
    np.testing.assert_allclose(float(model.optimizer.learning_rate), 1.25e-4, rtol=1e-6)
    assert RunConfig.load(run / "config.json").training.lr_decay_epochs == (1, 2, 4)
    # ...but not rewrite the learning rate of an epoch it has trained.
    assert (
        main(["train", "--resume", str(run), "--epochs", "6", "--lr-decay-epochs", "2", "--quiet"])
        == 2
    )
    assert "epoch 1 (0-based; 5 are done) ran at 0.0005" in capsys.readouterr().err
