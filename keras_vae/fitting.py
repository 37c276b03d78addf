"""Fitting: the model a run config describes, the data pipelines, and ``model.fit`` with the
run's callbacks (learning-rate schedule, checkpoints, history, TensorBoard)."""

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_vae import data as datasets
from keras_vae import hardware, networks, registry
from keras_vae.model import VAE
from keras_vae.model_config import DistributionsConfig, NetworkConfig, VAEConfig
from keras_vae.optimizers import FusedAdam
from keras_vae.rundir import (
    TEST_SET_FILE,
    AtomicCheckpoint,
    load_checkpoint,
    new_run_dir,
    starting_point,
    trim_history,
)
from keras_vae.settings import ConfigError


class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
    """Stops when the validation ELBO has not improved for ``patience`` epochs, counting
    from a checkpoint's best value and its epochs since then, so that a resumed run stops
    where an uninterrupted one with this patience would (``EarlyStopping`` itself starts
    every ``fit`` afresh)."""

    def __init__(self, patience, best=-np.inf, wait=0):
        super().__init__(monitor="val_elbo", mode="max", patience=patience)
        self.resumed_from = (best, wait)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best, self.wait = self.resumed_from


def resolve_binarize(config):
    """Whether the data is binarized: dynamic binarization is the default for Bernoulli."""
    if config.data.binarize == "auto":
        return config.model.likelihood == "bernoulli"
    return config.data.binarize == "dynamic"


def evaluation_copy(config, x):
    """x as models are scored on it (test and validation sets): binarized once, with a
    fixed seed, when training binarizes."""
    return datasets.binarize_once(x) if resolve_binarize(config) else x


def with_condition(config, data):
    """``config`` (a ``RunConfig``) with, for a conditional model, the size of its
    labels read from ``data`` where not set: num_classes = 1 + the largest class of
    integer labels [N], condition_dim = C of real vectors [N, C]. Raises ValueError if a
    conditional model's data have no labels."""
    model = config.model
    if not model.conditional:
        return config
    if data.y_train is None or data.y_test is None:
        raise ValueError(
            f"a conditional model needs labels, and data {config.data.data!r} has none "
            f"(npz: y_train and y_test; images: sub-folders)"
        )
    if model.num_classes or model.condition_dim:
        return config
    y = np.concatenate([data.y_train, data.y_test])
    if y.ndim == 2:
        settings = {"condition_dim": int(y.shape[1])}
    elif np.issubdtype(y.dtype, np.integer) and len(y) and y.min() >= 0:
        settings = {"num_classes": int(y.max()) + 1}
    else:
        raise ValueError(
            f"labels of data {config.data.data!r} are neither classes (integers >= 0, one "
            f"per example) nor vectors [N, C]; got {y.dtype} of shape {y.shape}"
        )
    return dataclasses.replace(config, model=dataclasses.replace(model, **settings))


def build_model(config, data_shape, dtype="float32"):
    """The VAE of ``config`` (a ``ModelConfig``) for data of ``data_shape``: the named
    network family, likelihood, prior and posterior, the networks in the dtype policy
    ``dtype``."""
    distributions = config.part(DistributionsConfig)
    # The named pieces, each made with the settings its constructor names.
    settings = {**dataclasses.asdict(distributions), "seed": config.seed}
    likelihood = registry.make("likelihood", distributions.likelihood, settings)
    network = config.part(NetworkConfig)
    encoder, decoder = networks.build(
        network.architecture,
        data_shape,
        # A conditional decoder reads c(y) beside z.
        config.latent_dim + (config.num_classes or config.condition_dim),
        likelihood,
        dtype=dtype,
        seed=config.seed,
        **{k: v for k, v in dataclasses.asdict(network).items() if k != "architecture"},
    )
    return VAE(
        encoder,
        decoder,
        data_shape,
        likelihood=likelihood,
        prior=registry.make("prior", distributions.prior, settings),
        posterior=registry.make("posterior", distributions.posterior, settings, dtype=dtype),
        config=config.part(VAEConfig),
        dtype=dtype,
    )


def compile_model(model, config):
    """Compiles ``model`` with the optimizer, XLA and steps per execution of ``config`` (a
    ``TrainingConfig``)."""
    settings = {"learning_rate": config.learning_rate}
    if config.gradient_clipnorm:
        settings["global_clipnorm"] = config.gradient_clipnorm
    if config.optimizer == "adam":  # Keras's Adam update in fewer ops
        optimizer = FusedAdam(**settings)
    else:
        optimizer = keras.optimizers.get({"class_name": config.optimizer, "config": settings})
    model.compile(
        optimizer=optimizer,
        jit_compile=config.jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
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


def check_steps_per_execution(steps_per_execution, steps):
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
            f"{divisor})"
        )


def check_precision(precision):
    """Refuses mixed_bfloat16 where no GPU is visible and the CPU has no bfloat16
    instructions: there TensorFlow emulates it, slower than float32, and sums convolutions'
    kernel gradients in bfloat16 (docs/benchmarks.md)."""
    if precision == "mixed_bfloat16" and hardware.emulates_bfloat16():
        raise ConfigError(
            f"config key 'precision' mixed_bfloat16 needs a GPU or a CPU with bfloat16 "
            f"instructions (AVX512_BF16, AMX-BF16 or Arm BF16), and this CPU "
            f"({hardware.cpu_model()}) has none: TensorFlow would emulate bfloat16, slower "
            f"than float32 and with wrong convolution gradients; use float32"
        )


def split_validation(x_train, fraction):
    """(training part, validation part): the last ``fraction`` of the training examples
    (the order of the source, fixed) are held out for validation and checkpoint choice."""
    n_val = round(len(x_train) * fraction)
    return x_train[: len(x_train) - n_val], x_train[len(x_train) - n_val :]


@dataclass
class Fitted:
    """What ``fit`` leaves for the report: the run directory (a scratch folder on a
    non-chief worker), the evaluation copy of the test set and its labels, whether this
    call trained any epoch, and the labelled training set (its evaluation copy) where the
    data have labels."""

    model: VAE
    run_dir: Path
    chief: bool
    x_test: np.ndarray
    y_test: np.ndarray | None
    trained: bool
    x_train: np.ndarray | None = None
    y_train: np.ndarray | None = None


def fit(config, run_dir=None, resume=False, callbacks=(), verbose=1):
    """Trains (or, with ``resume``, continues) the run in ``run_dir`` (default: a new one)
    until ``config.training.epochs``; returns a ``Fitted``.

    A resumed run starts at the epoch after its last checkpoint, with the model, optimizer
    and sampler state of that checkpoint and the same data order, so it ends with the
    weights the uninterrupted run would have had.
    """
    config.validate()
    training = config.training
    check_precision(training.precision)
    seed = config.model.seed
    keras.utils.set_random_seed(seed)
    strategy = make_strategy(training.strategy)
    data = datasets.load(config.data.data, config.data.data_dir, config.data.download)
    config = with_condition(config, data)
    x_train, x_val = split_validation(data.x_train, config.data.validation_fraction)
    # Labels travel with the batches only to a model that reads them.
    y_train, y_val = (
        split_validation(data.y_train, config.data.validation_fraction)
        if config.model.conditional
        else (None, None)
    )
    if not len(x_train) or not len(data.x_test):
        raise ValueError(
            f"data {config.data.data!r} leaves {len(x_train)} training and "
            f"{len(data.x_test)} test examples (validation_fraction "
            f"{config.data.validation_fraction}); both must be >= 1"
        )
    if training.early_stopping_patience and not len(x_val):
        raise ValueError(
            f"early_stopping_patience {training.early_stopping_patience} needs validation "
            f"examples, and validation_fraction {config.data.validation_fraction} of "
            f"{len(data.x_train)} training examples holds out none"
        )
    steps = datasets.steps_per_epoch(len(x_train), training.batch_size)
    check_steps_per_execution(training.steps_per_execution, steps)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    resumed_from, state = starting_point(run_dir, config, resume)
    chief = is_chief(strategy)
    if not chief:
        # Every worker of a multi-worker run saves (saving reads mirrored variables), but
        # only the chief's files are the run's: the others write to a scratch folder.
        run_dir = Path(tempfile.mkdtemp(prefix="keras-vae-worker-"))
    with strategy.scope():
        if resumed_from:
            model = load_checkpoint(resumed_from)
        else:
            model = compile_model(
                build_model(config.model, data.shape, training.precision), training
            )
    # One check of the whole data set, before anything trains or is written: the per-batch
    # checks in the model are dropped when the step is XLA-compiled.
    model.check_data(data.x_train)
    model.check_data(data.x_test)
    if model.conditional:
        model.check_labels(data.y_train)
        model.check_labels(data.y_test)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    initial_epoch = state["epochs_completed"]
    # Epochs since the best validation ELBO: as many as the patience, and the run stops (or,
    # resumed, stays stopped) where an uninterrupted run with this patience would.
    wait = initial_epoch - state["best_epoch"]
    patience = training.early_stopping_patience
    config.save(run_dir / "config.json")
    trim_history(run_dir / "history.csv", initial_epoch)

    binarize = resolve_binarize(config)
    x_test = evaluation_copy(config, data.x_test)
    datasets.save_test_set(run_dir / TEST_SET_FILE, x_test, data.y_test)
    validation = None
    if len(x_val):
        validation = datasets.evaluation_dataset(
            evaluation_copy(config, x_val), training.batch_size, y_val
        )
    trained = initial_epoch < training.epochs and not (patience and wait >= patience)
    if trained:
        train_ds = datasets.training_dataset(
            x_train, training.batch_size, seed, binarize, initial_epoch, training.epochs, y_train
        )
        all_callbacks = [
            # First, so that the other callbacks log the epoch's learning rate.
            keras.callbacks.LearningRateScheduler(training.learning_rate_at),
            # The history row before the checkpoint that claims its epoch: a kill between
            # them leaves a row that the resume trims, never a checkpoint without its row.
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
            AtomicCheckpoint(
                checkpoints, config.to_dict()["model"], state["best_val_elbo"], state["best_epoch"]
            ),
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
            # Raise rather than stop: a diverged model must not be evaluated or exported.
            keras.callbacks.TerminateOnNaN(raise_error=True),
        ]
        if patience:
            all_callbacks.append(ResumedEarlyStopping(patience, state["best_val_elbo"], wait))
        model.fit(
            train_ds,
            epochs=training.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            shuffle=False,  # the stream is shuffled per epoch
            validation_data=validation,
            callbacks=all_callbacks + list(callbacks),
            verbose=verbose,
        )
    # The training set as the linear probe of the report reads it: binarized once, like x_test.
    x_probe = None if data.y_train is None else evaluation_copy(config, data.x_train)
    return Fitted(model, run_dir, chief, x_test, data.y_test, trained, x_probe, data.y_train)
