"""Bad input through the keras-vae command, table-driven: each case exits with code 2 and a
one-line message naming what was wrong; an unexpected error exits 1 with its traceback in a
file, or raised with --debug; nothing already written is lost."""

import json
import shutil
import zipfile

import keras
import numpy as np
import pytest

from keras_vae.cli import main
from keras_vae.rundir import STATE_ENTRY

FAST = ["--hidden-units", "16", "--latent-dim", "2", "--batch-size", "256", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished one-epoch run on the digits, and its export folder."""
    root = tmp_path_factory.mktemp("cli_errors")
    code = main(
        [
            "train",
            "--epochs",
            "1",
            "--plots",
            "false",
            "--run-dir",
            str(root / "run"),
            "--export-dir",
            str(root / "sm"),
            *FAST,
        ]
    )
    assert code == 0
    return root / "run"


def _copy_run(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _rewrite_state(checkpoint, state):
    """The checkpoint with its training state replaced by ``state`` (bytes or a dict)."""
    with zipfile.ZipFile(checkpoint) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    entries[STATE_ENTRY] = state if isinstance(state, bytes) else json.dumps(state).encode()
    with zipfile.ZipFile(checkpoint, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def _corrupt_middle(path):
    """Inverts 64 bytes in the middle of the file (inside the weights)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _cases(run, tmp):
    """(name, argv, text the one-line message must hold) after any setup on disk."""
    (tmp / "a_file").write_text("x")
    (tmp / "dup.yaml").write_text("model:\n  latent_dim: 3\n  latent_dim: 4\n")
    (tmp / "types.yaml").write_text("training:\n  epochs: true\n")
    (tmp / "escape.yaml").write_text("output:\n  export_name: ../../outside\n")
    (tmp / "tag.yaml").write_text("model: !!python/object/apply:os.system ['true']\n")
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    plain.save(tmp / "plain.keras")
    damaged = tmp / "damaged.keras"
    damaged.write_bytes((run / "checkpoints" / "last.keras").read_bytes())
    _corrupt_middle(damaged)
    states = {
        "negative": {"epochs_completed": -3, "best_val_elbo": -1.0, "best_epoch": 0, "model": {}},
        "no_model": {"epochs_completed": 1, "best_val_elbo": -1.0, "best_epoch": 0},
        "not_json": b"{epochs",
    }
    for name, state in states.items():
        copy = tmp / f"state_{name}"
        shutil.copytree(run, copy)
        _rewrite_state(copy / "checkpoints" / "last.keras", state)
    other = tmp / "other_model"
    shutil.copytree(run, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["hidden_units"] = [8]
    (other / "config.json").write_text(json.dumps(config))
    bad_test_set = tmp / "bad_test_set"
    shutil.copytree(run, bad_test_set)
    (bad_test_set / "test_set.npz").write_bytes(b"PK\x03\x04 truncated")
    runs = ["--runs-dir", str(tmp / "runs"), "--export-dir", str(tmp / "sm"), *FAST]
    return [
        (
            "export name with a path",
            ["export", str(run), "--name", "../x", "--export-dir", str(tmp / "sm")],
            "'../x'",
        ),
        (
            "absolute export name",
            ["export", str(run), "--name", str(tmp / "abs"), "--export-dir", str(tmp / "sm")],
            "plain name",
        ),
        (
            "export name flag",
            ["train", "--export-name", "a/b", *runs],
            "'export_name' must be a plain name",
        ),
        (
            "export name in a file",
            ["train", "--config", str(tmp / "escape.yaml"), *runs],
            "'export_name' must be a plain name",
        ),
        (
            "duplicate YAML key",
            ["train", "--config", str(tmp / "dup.yaml")],
            "'latent_dim' is given twice",
        ),
        (
            "YAML value of another type",
            ["train", "--config", str(tmp / "types.yaml")],
            "'epochs' must be of type int; got True",
        ),
        ("YAML python tag", ["train", "--config", str(tmp / "tag.yaml")], "not valid JSON/YAML"),
        ("seed below range", ["train", "--seed", "-1", *runs], "'seed' must be None or"),
        ("seed above range", ["train", "--seed", str(2**40), *runs], "'seed' must be None or"),
        ("run dir is a file", ["train", "--run-dir", str(tmp / "a_file"), *runs], "a_file"),
        (
            "report path is a folder",
            ["evaluate", str(run), "--k", "2", "--output", str(tmp)],
            str(tmp),
        ),
        (
            "a Keras model that is not a VAE",
            ["evaluate", str(tmp / "plain.keras"), "--data", "digits"],
            "holds a Sequential, not a keras-vae",
        ),
        (
            "a damaged .keras file",
            ["evaluate", str(damaged), "--data", "digits"],
            "cannot load the model in",
        ),
        (
            "negative epochs in a checkpoint",
            ["train", "--resume", str(tmp / "state_negative")],
            "'epochs_completed' must be an integer >= 0; got -3",
        ),
        (
            "checkpoint state without its model",
            ["train", "--resume", str(tmp / "state_no_model")],
            "'model' must be the run config's model section",
        ),
        (
            "unreadable checkpoint state",
            ["train", "--resume", str(tmp / "state_not_json")],
            "keras_vae_state.json cannot be read",
        ),
        (
            "checkpoint of another model",
            ["train", "--resume", str(other)],
            "holds another model than config.json describes (differing: hidden_units)",
        ),
        (
            "resume with --run-dir",
            ["train", "--resume", str(run), "--run-dir", str(tmp)],
            "leave out --run-dir",
        ),
        ("damaged test set", ["evaluate", str(bad_test_set), "--k", "2"], "test_set.npz"),
        (
            "early stopping turned on at resume",
            ["train", "--resume", str(run), "--early-stopping-patience", "3"],
            "trained without early stopping cannot turn it on: early_stopping_patience 0 -> 3",
        ),
        (
            "early stopping without validation examples",
            ["train", "--validation-fraction", "0.0001", "--early-stopping-patience", "2", *runs],
            "validation_fraction 0.0001 of 1437 training examples holds out none",
        ),
    ]


def test_bad_input_gets_one_line_and_exit_code_2(run_dir, tmp_path, capsys):
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    history = (run_dir / "history.csv").read_text()
    cases = _cases(run_dir, tmp_path)
    assert len(cases) >= 19
    for name, argv, text in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("keras-vae: error: "), (name, err)
        assert text in lines[0], (name, lines[0])
    # The finished run that several cases pointed at is untouched.
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert (run_dir / "history.csv").read_text() == history
    assert not (tmp_path.parent / "outside").exists()


def test_resume_refuses_fewer_epochs_than_trained(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--epochs",
                "2",
                "--plots",
                "false",
                "--run-dir",
                str(run),
                "--export-dir",
                str(tmp_path / "sm"),
                *FAST,
            ]
        )
        == 0
    )
    config = (run / "config.json").read_text()
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert (
        "'epochs' must be at least the 2 epochs the run has trained; got 1"
        in capsys.readouterr().err
    )
    assert (run / "config.json").read_text() == config


def test_resuming_a_finished_run_exports_nothing_new(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    export = json.loads((run / "export.json").read_text())["saved_model"]
    versions = sorted(p.name for p in (run_dir.parent / "sm" / "vae").iterdir())
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the run had finished" in out and f"SavedModel: {export}" in out
    assert sorted(p.name for p in (run_dir.parent / "sm" / "vae").iterdir()) == versions
    # Exporting elsewhere is a change a resume may make, and then it exports.
    assert main(["train", "--resume", str(run), "--export-name", "again", "--quiet"]) == 0
    assert (run_dir.parent / "sm" / "again" / "1" / "saved_model.pb").is_file()


def test_unexpected_errors_keep_their_traceback(monkeypatch, capsys):
    from keras_vae import cli

    def broken(path):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "load_run_or_model", broken)
    assert main(["sample", "somewhere"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "keras-vae: unexpected error: ZeroDivisionError: a bug; the traceback is in "
    )
    path = err.split("the traceback is in ")[1].split(" (--debug")[0]
    with open(path) as f:
        assert "in broken" in f.read()
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "sample", "somewhere"])


def test_history_is_complete_after_a_kill_right_after_a_checkpoint(tmp_path, monkeypatch):
    from keras_vae.rundir import AtomicCheckpoint, read_history

    save = AtomicCheckpoint._save

    class Killed(BaseException):  # as a signal would, past the CLI's error handling
        pass

    def save_then_die(self, name, epochs_completed):
        save(self, name, epochs_completed)
        if name == "last.keras" and epochs_completed == 2:
            raise Killed  # after the checkpoint that claims epoch 2 is in place

    run = tmp_path / "run"
    argv = ["--plots", "false", "--export-dir", str(tmp_path / "sm"), *FAST]
    monkeypatch.setattr(AtomicCheckpoint, "_save", save_then_die)
    with pytest.raises(Killed):
        main(["train", "--epochs", "4", "--run-dir", str(run), *argv])
    monkeypatch.setattr(AtomicCheckpoint, "_save", save)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    history = read_history(run / "history.csv")
    assert len(history["loss"]) == 4
    with open(run / "history.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["0", "1", "2", "3"]
    np.testing.assert_allclose(history["loss"], -np.array(history["elbo"]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["MemoryError", "ResourceExhaustedError"])
def test_a_model_too_large_for_memory_is_named(kind, monkeypatch, capsys):
    import tensorflow as tf

    from keras_vae import cli

    def too_large(path):
        if kind == "MemoryError":
            raise MemoryError
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(cli, "load_run_or_model", too_large)
    assert main(["sample", "somewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keras-vae: error: out of memory")
    assert "make the model or the batch smaller" in err[0]
