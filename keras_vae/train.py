"""A training run: data → model → fit with callbacks → metrics, plots, SavedModel.

A run directory holds ``config.json``, ``history.csv``, ``checkpoints/{last,best}.keras``,
``test_set.npz``, ``tensorboard/``, ``plots/*.png``, ``metrics.json`` and ``export.json``
(the SavedModel path).
"""

import csv
import json
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_vae import data as datasets
from keras_vae import files, plots
from keras_vae.config import ConfigError, RunConfig
from keras_vae.evaluate import evaluate
from keras_vae.export import export_model
from keras_vae.model import VAE
from keras_vae.optimizers import FusedAdam

# K of the importance-weighted log p(x) in a run's final metrics.
FINAL_EVAL_SAMPLES = 100


@dataclass
class RunResult:
    model: VAE
    run_dir: Path
    metrics: dict
    export_path: Path | None


STATE_ENTRY = "keras_vae_state.json"
# What a resumed run may change: how long it trains, the learning rates of the epochs it
# has not trained yet, and what it writes after training.
RESUMABLE_KEYS = ("epochs", "lr_decay_epochs", "lr_decay_factor", "plots", "export_dir",
                  "export_name")
# The run's evaluation copy of the test set (see data.save_test_set).
TEST_SET_FILE = "test_set.npz"


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (weights, optimizer, sampler state) as ``last.keras`` after
    every epoch and as ``best.keras`` when the validation ELBO improves.

    Unlike ``keras.callbacks.ModelCheckpoint``, each file is written atomically
    (``files.atomic_path``), so a run killed while saving never leaves a corrupt checkpoint; an
    epoch whose logs hold NaN or inf is not saved at all. Each file also carries the number
    of completed epochs, the best validation ELBO so far and the epoch count it was reached
    at (``checkpoint_state``), which a resumed run starts from.
    """

    def __init__(self, folder, best=-np.inf, best_epoch=0):
        super().__init__()
        self.folder = Path(folder)
        self.best, self.best_epoch = best, best_epoch

    def _save(self, name, epochs_completed):
        with files.atomic_path(self.folder / name) as tmp:
            self.model.save(tmp)
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(STATE_ENTRY, json.dumps(
                    {"epochs_completed": epochs_completed, "best_val_elbo": self.best,
                     "best_epoch": self.best_epoch}))

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
    """The model saved in the ``.keras`` file at ``path``; a ValueError names the file if
    it holds none."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .keras model: not a zip archive")
    try:
        return keras.saving.load_model(path)
    except (ValueError, KeyError, OSError, TypeError) as error:
        raise ValueError(f"cannot load the model in {path}: {error}") from error


def checkpoint_state(path):
    """``{"epochs_completed", "best_val_elbo", "best_epoch"}`` stored in a checkpoint by
    AtomicCheckpoint (``best_epoch``: epochs completed when ``best_val_elbo`` was reached)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a keras-vae checkpoint: not a zip archive")
    with zipfile.ZipFile(path) as archive:
        if STATE_ENTRY not in archive.namelist():
            raise ValueError(f"{path} is not a keras-vae checkpoint: it has no {STATE_ENTRY} "
                             f"(a model saved with model.save cannot be resumed)")
        state = json.loads(archive.read(STATE_ENTRY))
    # Checkpoints written before best_epoch was stored: count from the resume.
    state.setdefault("best_epoch", state["epochs_completed"])
    return state


class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
    """Stops when the validation ELBO has not improved for ``patience`` epochs, counting
    from a checkpoint's best value and its epochs since then, so that a resumed run stops
    where the uninterrupted one would (``EarlyStopping`` itself starts every ``fit`` afresh).
    """

    def __init__(self, patience, best=-np.inf, wait=0):
        super().__init__(monitor="val_elbo", mode="max", patience=patience)
        self.resumed_from = (best, wait)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best, self.wait = self.resumed_from


def saved_config(run_dir):
    """The config a run in ``run_dir`` was trained with, to resume it."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {run_dir}: no config.json")
    return RunConfig.load(path)


def resolve_binarize(config):
    """Whether the data is binarized: dynamic binarization is the default for Bernoulli."""
    if config.binarize == "auto":
        return config.likelihood == "bernoulli"
    return config.binarize == "dynamic"


def evaluation_copy(config, x):
    """x as models are scored on it (test and validation sets): binarized once, with a
    fixed seed, when training binarizes."""
    return datasets.binarize_once(x) if resolve_binarize(config) else x


def build_model(config, data_shape, steps_per_epoch):
    """The compiled VAE of ``config``, its networks in ``config.precision``."""
    model = VAE(
        data_shape,
        latent_dim=config.latent_dim,
        architecture=config.architecture,
        hidden_units=config.hidden_units,
        filters=config.filters,
        activation=config.activation,
        dropout=config.dropout,
        likelihood=config.likelihood,
        sigma=config.sigma,
        learn_sigma=config.learn_sigma,
        beta=config.beta,
        kl_warmup_steps=round(config.kl_warmup_epochs * steps_per_epoch),
        kl=config.kl,
        objective=config.objective,
        num_samples=config.num_samples,
        gradient_estimator=config.gradient_estimator,
        seed=config.seed,
        dtype=config.precision,
    )
    if config.optimizer == "adam":  # Keras's Adam update in fewer ops
        optimizer = FusedAdam(config.learning_rate)
    else:
        optimizer = keras.optimizers.get(
            {"class_name": config.optimizer, "config": {"learning_rate": config.learning_rate}})
    model.compile(optimizer=optimizer, jit_compile=config.jit_compile,
                  steps_per_execution=config.steps_per_execution)
    return model


def make_strategy(name):
    """The ``tf.distribute`` strategy for the ``strategy`` config key."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """True unless this process is a non-chief worker of a multi-worker run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def new_run_dir(config):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = config.data.split(":")[0] if ":" in config.data else config.data
    base = Path(config.runs_dir) / f"{stamp}-{tag}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = Path(f"{base}-{n}")
    return run_dir


def _check_resumed_config(saved, config, epochs_done):
    """Refuses a config that differs from the run's saved one outside ``RESUMABLE_KEYS``, or
    a learning-rate schedule that would rewrite epochs already trained, so that the run's
    config.json keeps describing exactly how it was trained."""
    saved_values, values = saved.to_dict(), config.to_dict()
    changed = [f"{key}: {saved_values[key]!r} -> {values[key]!r}" for key in values
               if key not in RESUMABLE_KEYS and values[key] != saved_values[key]]
    if changed:
        raise ConfigError(
            f"a resumed run keeps its saved config; only {', '.join(RESUMABLE_KEYS)} may "
            f"change (got {'; '.join(changed)})")
    for epoch in range(epochs_done):
        before, after = saved.learning_rate_at(epoch), config.learning_rate_at(epoch)
        if before != after:
            raise ConfigError(
                f"a resumed run may change the learning rate of epochs not trained yet only: "
                f"epoch {epoch} (0-based; {epochs_done} are done) ran at {before!r}, the new "
                f"lr_decay_epochs/lr_decay_factor give {after!r}")


def _prepare_history(path, epochs, config, validation):
    """Keeps the CSV rows of the first ``epochs`` epochs (the ones the checkpoint holds).

    CSVLogger appends rows under the header already in the file, in the order of its own
    sorted keys: a history written before the learning rate was logged gets the column,
    filled from the schedule, so that appended rows line up with the header. With no epoch
    kept, the file goes, and CSVLogger writes it afresh.
    """
    if epochs == 0:
        path.unlink(missing_ok=True)
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if int(row["epoch"]) < epochs]
        fields = reader.fieldnames
    missing = {"learning_rate"} | (set() if validation else {"val_learning_rate"})
    fields = ["epoch"] + sorted(set(fields[1:]) | missing)
    for row in rows:
        # As Keras logs it: the optimizer's float32 variable.
        lr = np.float32(config.learning_rate_at(int(row["epoch"])))
        row.setdefault("learning_rate", repr(float(lr)))
        row.setdefault("val_learning_rate", "NA")
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _trained_epochs(path):
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
    return {key: [float(row[key]) for row in rows] for key in rows[0]
            if key != "epoch" and "NA" not in {row[key] for row in rows}}


def _check_steps_per_execution(steps_per_execution, steps):
    """Keras runs whole executions of ``steps_per_execution`` steps, also past
    ``steps_per_epoch`` (600 steps at 16 a time run 608): on our one stream of all epochs'
    batches every epoch would end early in the next one's data, and a resumed run would see
    other batches than the uninterrupted one. So it must divide the steps of an epoch."""
    if steps % steps_per_execution:
        divisor = max(d for d in range(1, steps_per_execution) if steps % d == 0)
        raise ConfigError(
            f"config key 'steps_per_execution' must divide the {steps} steps of an epoch, "
            f"or Keras runs {-(-steps // steps_per_execution) * steps_per_execution} steps "
            f"an epoch; got {steps_per_execution} (the largest divisor below it is "
            f"{divisor})")


def _starting_point(run_dir, config, resume):
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
    elif (_trained_epochs(run_dir / "history.csv") or (run_dir / "metrics.json").exists()
          or (last.parent / "best.keras").exists()):
        raise FileNotFoundError(f"cannot resume {run_dir}: it has trained (history.csv, "
                                f"metrics.json or best.keras), but there is no checkpoint "
                                f"at {last}")
    else:
        resumed_from, state = None, start
    _check_resumed_config(saved, config, state["epochs_completed"])
    return resumed_from, state


def train(config, run_dir=None, resume=False, callbacks=(), verbose=1):
    """Trains (or, with ``resume``, continues) the run in ``run_dir``; returns a RunResult.

    A resumed run starts at the epoch after its last checkpoint, with the model, optimizer
    and sampler state of that checkpoint and the same data order, so it ends with the
    results the uninterrupted run would have had.
    """
    config.validate()
    keras.utils.set_random_seed(config.seed)
    strategy = make_strategy(config.strategy)
    data = datasets.load(config.data, config.data_dir)
    x_train, x_val = split_validation(data.x_train, config.validation_fraction)
    if not len(x_train) or not len(data.x_test):
        raise ValueError(
            f"data {config.data!r} leaves {len(x_train)} training and {len(data.x_test)} test "
            f"examples (validation_fraction {config.validation_fraction}); both must be >= 1")
    steps = datasets.steps_per_epoch(len(x_train), config.batch_size)
    _check_steps_per_execution(config.steps_per_execution, steps)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    resumed_from, state = _starting_point(run_dir, config, resume)
    chief = is_chief(strategy)
    if not chief:
        # Every worker of a multi-worker run saves (saving reads mirrored variables), but
        # only the chief's files are the run's: the others write to a scratch folder.
        run_dir = Path(tempfile.mkdtemp(prefix="keras-vae-worker-"))
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    with strategy.scope():
        model = (load_checkpoint(resumed_from) if resumed_from
                 else build_model(config, data.shape, steps))
    # One check of the whole data set, before anything trains: the per-batch checks in the
    # model are dropped when the step is XLA-compiled.
    model.check_data(data.x_train)
    model.check_data(data.x_test)
    initial_epoch = state["epochs_completed"]
    # Epochs since the best validation ELBO: as many as the patience, and the run had
    # stopped early; a resumed run then trains no further.
    wait = initial_epoch - state["best_epoch"]
    patience = config.early_stopping_patience
    config.save(run_dir / "config.json")
    _prepare_history(run_dir / "history.csv", initial_epoch, config, validation=len(x_val) > 0)

    binarize = resolve_binarize(config)
    x_test = evaluation_copy(config, data.x_test)
    datasets.save_test_set(run_dir / TEST_SET_FILE, x_test, data.y_test)
    validation = None
    if len(x_val):
        validation = datasets.evaluation_dataset(evaluation_copy(config, x_val),
                                                 config.batch_size)
    if initial_epoch < config.epochs and not (patience and wait >= patience):
        train_ds = datasets.training_dataset(
            x_train, config.batch_size, config.seed, binarize, initial_epoch, config.epochs)
        all_callbacks = [
            # First, so that the other callbacks log the epoch's learning rate.
            keras.callbacks.LearningRateScheduler(lambda epoch: config.learning_rate_at(epoch)),
            AtomicCheckpoint(checkpoints, state["best_val_elbo"], state["best_epoch"]),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
            # Raise rather than stop: a diverged model must not be evaluated or exported.
            keras.callbacks.TerminateOnNaN(raise_error=True),
        ]
        if patience:
            all_callbacks.append(
                ResumedEarlyStopping(patience, state["best_val_elbo"], wait))
        model.fit(
            train_ds, epochs=config.epochs, initial_epoch=initial_epoch,
            steps_per_epoch=steps, shuffle=False,  # the stream is shuffled per epoch
            validation_data=validation, callbacks=all_callbacks + list(callbacks),
            verbose=verbose)

    if not chief:
        return RunResult(model, run_dir, {}, None)
    # The run's model is its best checkpoint (by validation ELBO), as for `keras-vae
    # evaluate RUN`; without validation data, its last.
    best, last = checkpoints / "best.keras", checkpoints / "last.keras"
    model = load_checkpoint(best if best.is_file() else last)
    report, _ = evaluate(model, x_test, num_samples=FINAL_EVAL_SAMPLES, seed=config.seed)
    metrics = {"epochs_completed": checkpoint_state(last)["epochs_completed"],
               "checkpoint": "best.keras" if best.is_file() else "last.keras",
               "test": report}
    files.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if config.plots:
        write_plots(model, run_dir / "plots", read_history(run_dir / "history.csv"), x_test,
                    data.y_test, config.seed)
    export_path = export_model(model, config.export_dir, config.export_name)
    files.write_text(run_dir / "export.json",
                     json.dumps({"saved_model": str(export_path.resolve())}, indent=2) + "\n")
    return RunResult(model, run_dir, metrics, export_path)


def split_validation(x_train, fraction):
    """(training part, validation part): the last ``fraction`` of the training examples
    (the order of the source, fixed) are held out for validation and checkpoint choice."""
    n_val = round(len(x_train) * fraction)
    return x_train[: len(x_train) - n_val], x_train[len(x_train) - n_val:]


def write_plots(model, folder, history, x_test, y_test, seed=0):
    """Every figure of a run into ``folder``; those of images only for (H, W, C) data."""
    folder.mkdir(parents=True, exist_ok=True)
    plots.loss_curves(history, folder / "loss_curves.png")
    z_mean = model.encode_params(x_test)[0].numpy()
    plots.latent_scatter(z_mean, y_test, folder / "latent.png")
    if len(model.data_shape) != 3:
        return
    plots.reconstructions(x_test, model.reconstruct(x_test[:16]).numpy(),
                          folder / "reconstructions.png")
    plots.samples(model.sample(64, seed=seed).numpy(), folder / "samples.png")
    if model.latent_dim == 2:
        plots.manifold(lambda z: model.decode(z).mean().numpy(), folder / "manifold.png")
