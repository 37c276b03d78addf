"""One run's settings as a dataclass; read from JSON/YAML, overridden by flags, validated."""

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from keras_vae import files
from keras_vae.likelihoods import LIKELIHOODS, SIGMA_MODES
from keras_vae.model import GRADIENT_ESTIMATORS, KL_ESTIMATORS, OBJECTIVES
from keras_vae.networks import ARCHITECTURES, AUTOREGRESSIVE

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
STRATEGIES = ("default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
BINARIZE = ("auto", "dynamic", "none")
DATA_KINDS = ("digits", "tfds:", "npz:", "images:")


class ConfigError(ValueError):
    """A setting that is unknown or invalid; the message names the key."""


@dataclass
class RunConfig:
    """Everything that defines a training run (see README for each key)."""

    # data
    data: str = "digits"  # digits | tfds:NAME[:TRAIN_SPLIT[:TEST_SPLIT]] | npz:PATH | images:DIR
    data_dir: str | None = None  # TFDS data_dir
    binarize: str = "auto"  # auto: dynamic binarization for the Bernoulli likelihood
    validation_fraction: float = 0.1  # held out of the training set; 0: no validation
    # model
    architecture: str = "mlp"
    latent_dim: int = 8
    hidden_units: tuple[int, ...] = (256, 128)
    filters: tuple[int, ...] = (32, 64)
    activation: str = "relu"
    dropout: float = 0.0  # on the decoder's hidden units while training
    likelihood: str = "bernoulli"
    sigma: float = 1.0
    learn_sigma: str = "none"
    # objective
    beta: float = 1.0
    kl_warmup_epochs: float = 0.0
    kl: str = "analytic"
    objective: str = "elbo"
    num_samples: int = 1
    gradient_estimator: str = "reparam"  # reparam | dreg (IWAE only; see VAE)
    # optimization
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_decay_epochs: tuple[int, ...] = ()  # the epochs at which the learning rate drops
    lr_decay_factor: float = 0.1  # ... by this factor each time
    batch_size: int = 64
    epochs: int = 40
    early_stopping_patience: int = 0  # 0: off
    seed: int = 0
    # speed and scale
    strategy: str = "default"  # mirrored: GPUs of one host; multi_worker: hosts (TF_CONFIG)
    precision: str = "float32"  # mixed_float16 (GPUs) / mixed_bfloat16 (GPUs, AVX512_BF16 CPUs)
    jit_compile: bool = False  # XLA for the train step
    steps_per_execution: int = 1
    # outputs
    runs_dir: str = "runs"
    export_dir: str = "saved_models"
    export_name: str = "vae"
    plots: bool = True

    def validate(self):
        """Raises ConfigError naming the first invalid key."""
        autoregressive = self.architecture in AUTOREGRESSIVE
        checks = [
            ("data", self.data == "digits" or self.data.startswith(DATA_KINDS[1:]),
             f"must be one of {DATA_KINDS} (with its argument)"),
            ("binarize", self.binarize in BINARIZE, f"must be one of {BINARIZE}"),
            ("architecture", self.architecture in ARCHITECTURES,
             f"must be one of {ARCHITECTURES}"),
            ("likelihood", self.likelihood in LIKELIHOODS, f"must be one of {LIKELIHOODS}"),
            ("likelihood", not autoregressive or self.likelihood == "bernoulli",
             (f"must be 'bernoulli' for architecture {self.architecture!r} (a model of "
              "binary data)")),
            ("binarize", not autoregressive or self.binarize != "none",
             (f"must binarize the data for architecture {self.architecture!r} (a model of "
              "binary data)")),
            ("hidden_units", not autoregressive or len(self.hidden_units) >= 1,
             f"needs at least one width for architecture {self.architecture!r}"),
            ("learn_sigma", self.learn_sigma in SIGMA_MODES, f"must be one of {SIGMA_MODES}"),
            ("kl", self.kl in KL_ESTIMATORS, f"must be one of {KL_ESTIMATORS}"),
            ("objective", self.objective in OBJECTIVES, f"must be one of {OBJECTIVES}"),
            ("gradient_estimator", self.gradient_estimator in GRADIENT_ESTIMATORS,
             f"must be one of {GRADIENT_ESTIMATORS}"),
            ("gradient_estimator", self.gradient_estimator != "dreg" or self.objective == "iwae",
             "'dreg' estimates the IWAE bound's gradient: it needs objective 'iwae'"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
            ("strategy", self.strategy in STRATEGIES, f"must be one of {STRATEGIES}"),
            ("precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}"),
            ("steps_per_execution", self.steps_per_execution >= 1, "must be >= 1"),
            # Keras's multi-step loop fails under tf.distribute with "You must feed a value
            # for placeholder tensor" (keras-team/keras#19246, also for a plain Dense model).
            ("steps_per_execution",
             self.steps_per_execution == 1 or self.strategy == "default",
             f"must be 1 with strategy {self.strategy!r} (keras-team/keras#19246)"),
            ("latent_dim", self.latent_dim >= 1, "must be >= 1"),
            ("num_samples", self.num_samples >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("sigma", 0 < self.sigma < math.inf, "must be finite and > 0"),
            ("beta", 0 <= self.beta < math.inf, "must be finite and >= 0"),
            ("kl_warmup_epochs", 0 <= self.kl_warmup_epochs < math.inf, "must be finite and >= 0"),
            ("learning_rate", 0 < self.learning_rate < math.inf, "must be finite and > 0"),
            ("lr_decay_epochs", all(a < b for a, b in
                                    zip((0,) + self.lr_decay_epochs, self.lr_decay_epochs)),
             "must be increasing epoch numbers > 0"),
            ("lr_decay_factor", 0 < self.lr_decay_factor <= 1, "must be in (0, 1]"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "must be >= 0"),
            ("validation_fraction", 0 <= self.validation_fraction < 1, "must be in [0, 1)"),
            ("early_stopping_patience",
             not self.early_stopping_patience or self.validation_fraction > 0,
             "needs validation data (validation_fraction > 0)"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("hidden_units", all(n >= 1 for n in self.hidden_units), "widths must be >= 1"),
            ("filters", len(self.filters) >= 1 and all(n >= 1 for n in self.filters),
             "needs at least one width, each >= 1"),
            ("filters", self.architecture != "pixelcnn_made" or len(set(self.filters)) == 1,
             "must be equal widths (residual layers) for architecture 'pixelcnn_made'"),
        ]
        for key, ok, requirement in checks:
            if not ok:
                raise ConfigError(f"config key {key!r} {requirement}; got {getattr(self, key)!r}")
        return self

    def learning_rate_at(self, epoch):
        """The learning rate of (0-based) epoch ``epoch``: learning_rate · lr_decay_factorⁿ,
        n the number of ``lr_decay_epochs`` ≤ epoch."""
        drops = sum(e <= epoch for e in self.lr_decay_epochs)
        return float(self.learning_rate * self.lr_decay_factor**drops)

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values, base=None):
        """A config from ``base`` (default: the defaults) with ``values`` applied and checked."""
        base = base or cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        updates = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {key!r}; known keys: {', '.join(fields)}")
            updates[key] = coerce(key, value, fields[key].type)
        return dataclasses.replace(base, **updates).validate()

    def save(self, path):
        files.write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path):
        """The config ``save`` wrote to ``path`` (a run's ``config.json``), checked."""
        return cls.from_dict(load_config_file(path))


def coerce(key, value, annotation):
    """Turns a JSON/YAML value or a command-line string into the field's type."""
    optional = type(None) in typing.get_args(annotation)
    kind = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional \
        else annotation
    kind = typing.get_origin(kind) or kind
    try:
        if value is None or (optional and value in ("", "none", "None")):
            if optional:
                return None
            raise TypeError("null is not allowed")
        if kind is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(int(v) for v in value)
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"config key {key!r} must be of type {getattr(kind, '__name__', kind)}; "
            f"got {value!r}") from error


def load_config_file(path):
    """The key/value mapping of a JSON or YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path} is not valid JSON/YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return values

