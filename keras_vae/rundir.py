"""A run directory: its paths, its checkpoints and their state, and the resume checks.

A run directory holds ``config.json``, ``history.csv``, ``checkpoints/{last,best}.keras``,
``test_set.npz``, ``tensorboard/``, ``plots/*.png``, ``metrics.json`` and ``export.json``
(the SavedModel path).
"""

import csv
import json
import time
import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np

from keras_vae import files
from keras_vae.config import RESUMABLE, ConfigError, RunConfig
from keras_vae.model import VAE

STATE_ENTRY = "keras_vae_state.json"
# The run's evaluation copy of the test set (see data.save_test_set).
TEST_SET_FILE = "test_set.npz"


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (weights, optimizer, sampler state) as ``last.keras`` after
    every epoch and as ``best.keras`` when the validation ELBO improves.

    Unlike ``keras.callbacks.ModelCheckpoint``, each file is written atomically
    (``files.atomic_path``), so a run killed while saving never leaves a corrupt checkpoint; an
    epoch whose logs hold NaN or inf is not saved at all. Each file also carries the number
    of completed epochs, the best validation ELBO so far and the epoch count it was reached
    at, and the run config's model section it was built from (``checkpoint_state``), which
    a resumed run starts from.
    """

    def __init__(self, folder, model_settings, best=-np.inf, best_epoch=0):
        super().__init__()
        self.folder = Path(folder)
        self.model_settings = model_settings
        self.best, self.best_epoch = best, best_epoch

    def _save(self, name, epochs_completed):
        with files.atomic_path(self.folder / name) as tmp:
            self.model.save(tmp)
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(
                    STATE_ENTRY,
                    json.dumps(
                        {
                            "epochs_completed": epochs_completed,
                            "best_val_elbo": self.best,
                            "best_epoch": self.best_epoch,
                            "model": self.model_settings,
                        }
                    ),
                )

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not all(np.isfinite(value) for value in logs.values()):
            return
        value = logs.get("val_elbo")
        if value is not None and value > self.best:
            self.best, self.best_epoch = value, epoch + 1
            self._save("best.keras", epoch + 1)
        self._save("last.keras", epoch + 1)


def load_checkpoint(path):
    """The keras-vae model saved in the ``.keras`` file at ``path``; a ValueError names the
    file if it holds none, is damaged, or holds another kind of model."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .keras model: not a zip archive")
    try:
        # Keras reads the weights without checking the archive's CRCs: a damaged file
        # would load with wrong weights.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise ValueError(f"{damaged} fails its CRC check")
        model = keras.saving.load_model(path)
    except (
        ValueError,
        KeyError,
        OSError,
        TypeError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
    ) as error:
        raise ValueError(f"cannot load the model in {path}: {files.one_line(error, 300)}") from None
    if not isinstance(model, VAE):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a keras-vae model")  # noqa: TRY004 (a bad file)
    return model


def checkpoint_state(path):
    """``{"epochs_completed", "best_val_elbo", "best_epoch", "model"}`` stored in a
    checkpoint by AtomicCheckpoint (``best_epoch``: epochs completed when ``best_val_elbo``
    was reached; ``model``: the run config's model section)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a keras-vae checkpoint: not a zip archive")
    with zipfile.ZipFile(path) as archive:
        if STATE_ENTRY not in archive.namelist():
            raise ValueError(
                f"{path} is not a keras-vae checkpoint: it has no {STATE_ENTRY} "
                f"(a model saved with model.save cannot be resumed)"
            )
        try:
            state = json.loads(archive.read(STATE_ENTRY))
        except (ValueError, zipfile.BadZipFile, zlib.error) as error:
            raise ValueError(f"{path}: its {STATE_ENTRY} cannot be read ({error})") from None
    _check_state(path, state)
    return state


def _check_state(path, state):
    """Raises ValueError naming the key unless ``state`` is what AtomicCheckpoint writes."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: its {STATE_ENTRY} is not a mapping")  # noqa: TRY004 (a bad file)
    done = state.get("epochs_completed")
    checks = [
        (
            "epochs_completed",
            isinstance(done, int) and not isinstance(done, bool) and done >= 0,
            "an integer >= 0",
        ),
        (
            "best_epoch",
            isinstance(state.get("best_epoch"), int)
            and isinstance(done, int)
            and 0 <= state["best_epoch"] <= done,
            "an integer in [0, epochs_completed]",
        ),
        ("best_val_elbo", isinstance(state.get("best_val_elbo"), float), "a number"),
        ("model", isinstance(state.get("model"), dict), "the run config's model section"),
    ]
    for key, ok, requirement in checks:
        if not ok:
            raise ValueError(
                f"{path}: {STATE_ENTRY} key {key!r} must be {requirement}; got {state.get(key)!r}"
            )


def saved_config(run_dir):
    """The config a run in ``run_dir`` was trained with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.json")
    return RunConfig.load(path)


def run_checkpoint(run_dir):
    """The run's model checkpoint: ``best.keras`` (by validation ELBO), else ``last.keras``;
    a FileNotFoundError if it has neither."""
    checkpoints = Path(run_dir) / "checkpoints"
    for name in ("best.keras", "last.keras"):
        if (checkpoints / name).is_file():
            return checkpoints / name
    raise FileNotFoundError(f"run directory {run_dir} has no checkpoint")


def new_run_dir(config):
    """A new folder name ``RUNS_DIR/<time>-<kind of data>`` (``-2``, ``-3``… if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = config.data.data.partition(":")[0]
    base = Path(config.output.runs_dir) / f"{stamp}-{tag}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = Path(f"{base}-{n}")
    return run_dir


def _check_resumed_config(saved, config, epochs_done):
    """Refuses a config that differs from the run's saved one outside ``RESUMABLE``, a
    shorter early-stopping patience, or a learning-rate schedule that would rewrite epochs
    already trained, so that the run's config.json keeps describing exactly how it was
    trained."""
    saved_values, values = saved.to_dict(), config.to_dict()
    changed = [
        f"{key}: {saved_values[section][key]!r} -> {value!r}"
        for section, keys in values.items()
        for key, value in keys.items()
        if key not in RESUMABLE.get(section, ()) and value != saved_values[section][key]
    ]
    if changed:
        resumable = ", ".join(key for keys in RESUMABLE.values() for key in keys)
        raise ConfigError(
            f"a resumed run keeps its saved config; only {resumable} may change "
            f"(early_stopping_patience only lengthened; got "
            f"{'; '.join(changed)})"
        )
    # A longer patience (or none) would not have stopped the epochs trained under the
    # saved one; a shorter one, or one where there was none, might have.
    saved_patience, patience = (
        saved.training.early_stopping_patience,
        config.training.early_stopping_patience,
    )
    if patience and not saved_patience:
        raise ConfigError(
            f"a resumed run trained without early stopping cannot turn it on: "
            f"early_stopping_patience 0 -> {patience}"
        )
    if 0 < patience < saved_patience:
        raise ConfigError(
            f"a resumed run may lengthen its early_stopping_patience or turn it off (0), "
            f"not shorten it: {saved_patience} -> {patience}"
        )
    for epoch in range(epochs_done):
        before = saved.training.learning_rate_at(epoch)
        after = config.training.learning_rate_at(epoch)
        if before != after:
            raise ConfigError(
                f"a resumed run may change the learning rate of epochs not trained yet only: "
                f"epoch {epoch} (0-based; {epochs_done} are done) ran at {before!r}, the new "
                f"lr_decay_epochs/lr_decay_factor give {after!r}"
            )


def trim_history(path, epochs):
    """Keeps the CSV rows of the first ``epochs`` epochs (the ones the checkpoint holds);
    with none kept, the file goes, and CSVLogger writes it afresh."""
    if epochs == 0:
        path.unlink(missing_ok=True)
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if int(row["epoch"]) < epochs]
        fields = reader.fieldnames
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def trained_epochs(path):
    """The number of epochs recorded in the CSV history at ``path`` (0 if there is none)."""
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def read_history(path):
    """{metric: values by epoch} from the CSV history; CSVLogger writes "NA" for the
    validation columns of a run without validation data, and those are left out."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        key: [float(row[key]) for row in rows]
        for key in rows[0]
        if key != "epoch" and "NA" not in {row[key] for row in rows}
    }


def starting_point(run_dir, config, resume):
    """(checkpoint to resume from or None, its state): a new run, or a resumed one stopped
    before its first checkpoint, starts at epoch 0; a resumed run otherwise at its last
    checkpoint, with a config that differs from its saved one only where a resume may."""
    last = run_dir / "checkpoints" / "last.keras"
    start = {"epochs_completed": 0, "best_val_elbo": -np.inf, "best_epoch": 0}
    if not resume:
        if (run_dir / "config.json").exists():
            raise FileExistsError(f"run directory {run_dir} already holds a run; use resume")
        return None, start
    saved = saved_config(run_dir)
    if last.is_file():
        resumed_from, state = last, checkpoint_state(last)
    elif (
        trained_epochs(run_dir / "history.csv")
        or (run_dir / "metrics.json").exists()
        or (last.parent / "best.keras").exists()
    ):
        raise FileNotFoundError(
            f"cannot resume {run_dir}: it has trained (history.csv, "
            f"metrics.json or best.keras), but there is no checkpoint "
            f"at {last}"
        )
    else:
        resumed_from, state = None, start
    done = state["epochs_completed"]
    described = saved.to_dict()["model"]
    if resumed_from and state["model"] != described:
        changed = sorted(
            key for key, value in state["model"].items() if described.get(key) != value
        )
        raise ValueError(
            f"cannot resume {run_dir}: its checkpoint {last} holds another model "
            f"than config.json describes (differing: {', '.join(changed)})"
        )
    if config.training.epochs < done:
        raise ConfigError(
            f"config key 'epochs' must be at least the {done} epochs the run has "
            f"trained; got {config.training.epochs}"
        )
    _check_resumed_config(saved, config, done)
    return resumed_from, state
