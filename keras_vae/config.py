"""A training run's settings in four sections, read from JSON/YAML, overridden by flags.

- ``data``: where the examples come from and how they are prepared (``DataConfig``);
- ``model``: the model's settings (``ModelConfig``: ``VAEConfig``, ``NetworkConfig`` and
  ``DistributionsConfig`` together);
- ``training``: the optimizer, schedule and devices (``TrainingConfig``);
- ``output``: what is written where (``OutputConfig``).

A config file holds these sections as mappings (``keras-vae config`` prints one with every
default and its help); every setting is also a flag of its own name (``--latent-dim``).
No TensorFlow is imported here.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from keras_vae import files
from keras_vae.model_config import DistributionsConfig, NetworkConfig, VAEConfig
from keras_vae.settings import (
    ConfigError,
    choices_of,
    coerce,
    fail,
    finite_nonnegative,
    finite_positive,
    positive,
    setting,
    unit_interval_open_right,
    validate,
)

DATA_KINDS = ("digits", "tfds:", "npz:", "images:")
HIERARCHICAL_POSTERIORS = ("bottom_up", "top_down", "ladder")


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are prepared."""

    data: str = setting(
        "digits",
        "data source: digits (scikit-learn's 8×8 digits, offline), "
        "tfds:NAME[:TRAIN_SPLIT[:TEST_SPLIT]], npz:PATH (Keras layout) or images:DIR",
        check=lambda v: v == "digits" or v.startswith(DATA_KINDS[1:]) and bool(v.partition(":")[2]),
        requirement=f"be one of {DATA_KINDS} (with its argument)",
    )
    data_dir: str | None = setting(None, "TFDS data_dir (prepared data, for offline use)")
    download: bool = setting(
        False, "let TFDS download a data set not prepared in data_dir (else say so at once)"
    )
    binarize: str = setting(
        "auto",
        "dynamic: a fresh x ~ Bernoulli(pixel) each epoch (the test set binarized "
        "once, fixed seed); auto: dynamic for the Bernoulli likelihood; none",
        choices=("auto", "dynamic", "none"),
    )
    validation_fraction: float = setting(
        0.1,
        "the last part of the training set held out for validation and checkpoint choice; 0: none",
        check=unit_interval_open_right,
        requirement="be in [0, 1)",
    )


@dataclass(frozen=True)
class ModelConfig(DistributionsConfig, NetworkConfig, VAEConfig):
    """The model's settings: the network family (``NetworkConfig``), the likelihood, prior
    and posterior (``DistributionsConfig``) and the objective (``VAEConfig``)."""

    conditional: bool = setting(
        False,
        "condition q(z|x, y) and p(x|z, y) on the data set's labels y: integer classes "
        "(num_classes read from the labels unless set) or real vectors (condition_dim "
        "likewise)",
    )

    def rules(self):
        return (
            [
                (
                    "conditional",
                    self.conditional or not (self.num_classes or self.condition_dim),
                    "must be true where num_classes or condition_dim is set",
                ),
                (
                    "seed",
                    self.seed is not None,
                    "must be an integer for a run (it seeds the data order)",
                ),
                (
                    "latent_layers",
                    not self.latent_layers or sum(self.latent_layers) == self.latent_dim,
                    f"must sum to latent_dim ({self.latent_dim})",
                ),
                (
                    "latent_layers",
                    not self.latent_layers
                    or self.prior == "hierarchical"
                    or self.posterior in HIERARCHICAL_POSTERIORS,
                    (
                        "are read by the hierarchical prior and posteriors only: set prior "
                        f"'hierarchical' or a posterior of {HIERARCHICAL_POSTERIORS}"
                    ),
                ),
                (
                    "posterior",
                    self.posterior != "ladder" or self.prior == "hierarchical",
                    (
                        "'ladder' merges with the hierarchical prior's p(z_l|z_l+1): it needs "
                        "prior 'hierarchical'"
                    ),
                ),
            ]
            + NetworkConfig.rules(self)
            + VAEConfig.rules(self)
            + [
                (
                    "likelihood",
                    not self.autoregressive or self.likelihood == "bernoulli",
                    (
                        f"must be 'bernoulli' for architecture {self.architecture!r} (a model of "
                        f"binary data)"
                    ),
                )
            ]
        )

    def part(self, cls):
        """The settings of ``cls`` (one of the three parts) as an instance of it."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class TrainingConfig:
    """How the model is fitted."""

    optimizer: str = setting(
        "adam",
        "adam is keras_vae.FusedAdam (Keras's Adam update in fewer ops)",
        choices=("adam", "adamw", "rmsprop", "sgd"),
    )
    learning_rate: float = setting(
        1e-3,
        "learning rate of the first epoch",
        check=finite_positive,
        requirement="be finite and > 0",
    )
    lr_decay_epochs: tuple[int, ...] = setting(
        (),
        "the (0-based) epochs at which the learning rate is multiplied by lr_decay_factor",
        check=lambda v: all(a < b for a, b in zip((0,) + v, v)),
        requirement="be increasing epoch numbers > 0",
    )
    lr_decay_factor: float = setting(
        0.1,
        "factor of each learning-rate decay",
        check=lambda v: 0 < v <= 1,
        requirement="be in (0, 1]",
    )
    gradient_clipnorm: float = setting(
        0.0,
        "clip each step's gradient to this global L2 norm (Keras's global_clipnorm); 0: off",
        check=finite_nonnegative,
        requirement="be finite and >= 0",
    )
    batch_size: int = setting(
        64,
        "examples per step (the global batch under a strategy)",
        check=positive,
        requirement="be >= 1",
    )
    epochs: int = setting(
        40,
        "epochs to train in all (a resumed run may extend it)",
        check=positive,
        requirement="be >= 1",
    )
    early_stopping_patience: int = setting(
        0,
        "stop when the validation ELBO has not improved for this many epochs; 0: off "
        "(a resumed run may lengthen it)",
        check=lambda v: v >= 0,
        requirement="be >= 0",
    )
    strategy: str = setting(
        "default",
        "mirrored: the GPUs of one host; multi_worker: several hosts (TF_CONFIG)",
        choices=("default", "mirrored", "multi_worker"),
    )
    precision: str = setting(
        "float32",
        "dtype policy of the networks: mixed_float16 (GPUs), "
        "mixed_bfloat16 (GPUs, CPUs with AVX512_BF16, AMX-BF16 or Arm BF16)",
        choices=("float32", "mixed_float16", "mixed_bfloat16"),
    )
    jit_compile: bool = setting(False, "XLA-compile the train step")
    steps_per_execution: int = setting(
        1,
        "train steps per call of the compiled function; must divide an epoch's steps",
        check=positive,
        requirement="be >= 1",
    )

    def rules(self):
        # Keras's multi-step loop fails under tf.distribute with "You must feed a value for
        # placeholder tensor" (keras-team/keras#19246, also for a plain Dense model).
        return [
            (
                "steps_per_execution",
                self.steps_per_execution == 1 or self.strategy == "default",
                f"must be 1 with strategy {self.strategy!r} (keras-team/keras#19246)",
            )
        ]

    def learning_rate_at(self, epoch):
        """The learning rate of (0-based) epoch ``epoch``: learning_rate · lr_decay_factorⁿ,
        n the number of ``lr_decay_epochs`` ≤ epoch."""
        drops = sum(e <= epoch for e in self.lr_decay_epochs)
        return float(self.learning_rate * self.lr_decay_factor**drops)


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes, and where."""

    runs_dir: str = setting("runs", "folder of the run directories <time>-<data>")
    export_dir: str = setting("saved_models", "folder of the SavedModels (NAME/VERSION/)")
    export_name: str = setting(
        "vae",
        "the SavedModel's model name (TF Serving's)",
        check=files.is_plain_name,
        requirement=f"be {files.PLAIN_NAME_RULE}",
    )
    plots: bool = setting(True, "write the run's figures (plots/*.png)")


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "output": OutputConfig,
}
# What a resumed run may change: how long it trains (its epochs, a longer early-stopping
# patience), the learning rates of the epochs it has not trained yet, and what it writes
# after training.
RESUMABLE = {
    "training": ("epochs", "early_stopping_patience", "lr_decay_epochs", "lr_decay_factor"),
    "output": ("plots", "export_dir", "export_name"),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run, by section."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    def validate(self):
        """Checks every section and the rules between sections; raises ConfigError naming
        the first invalid key, else returns the config."""
        for name in SECTIONS:
            validate(getattr(self, name))
        autoregressive = self.model.autoregressive
        rules = [
            (
                "binarize",
                not autoregressive or self.data.binarize != "none",
                self.data,
                (
                    f"must binarize the data for architecture {self.model.architecture!r} (a "
                    f"model of binary data)"
                ),
            ),
            (
                "early_stopping_patience",
                not self.training.early_stopping_patience or self.data.validation_fraction > 0,
                self.training,
                "needs validation data (validation_fraction > 0)",
            ),
        ]
        for key, ok, section, requirement in rules:
            if not ok:
                fail(key, requirement, getattr(section, key))
        return self

    def to_dict(self):
        """{section: {key: value}}, tuples as lists (JSON and YAML)."""
        return {
            name: {
                key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(getattr(self, name)).items()
            }
            for name in SECTIONS
        }

    def replace(self, values, from_text=False):
        """A checked copy with ``values`` {section: {key: value}} applied; unknown sections
        and keys, and values of the wrong type, are refused with their names."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"a config must be a mapping of the sections {', '.join(SECTIONS)}; got {values!r}"
            )
        sections = {}
        for name, updates in values.items():
            if name not in SECTIONS:
                raise ConfigError(
                    f"unknown config section {name!r}; the sections are {', '.join(SECTIONS)}"
                )
            if not isinstance(updates, dict):
                raise ConfigError(
                    f"config section {name!r} must be a mapping of keys to values; got {updates!r}"
                )
            fields = {f.name: f for f in dataclasses.fields(SECTIONS[name])}
            for key in updates:
                if key not in fields:
                    raise ConfigError(
                        f"unknown config key {key!r} in section {name!r}; "
                        f"its keys: {', '.join(fields)}"
                    )
            sections[name] = dataclasses.replace(
                getattr(self, name),
                **{
                    key: coerce(key, value, fields[key].type, from_text)
                    for key, value in updates.items()
                },
            )
        return dataclasses.replace(self, **sections).validate()

    def save(self, path):
        files.write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path):
        """The config of a JSON or YAML file (a run's ``config.json``, or a config file),
        over the defaults, checked."""
        return cls().replace(load_config_file(path))


def flag_table():
    """{flag name: (section, field)} for every setting; the flag is the field's name with
    dashes."""
    table = {}
    for name, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            flag = field.name.replace("_", "-")
            if flag in table:
                raise RuntimeError(f"two settings share the flag --{flag}")
            table[flag] = (name, field)
    return table


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the
    last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"config key {key!r} is given twice (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs):
    """A JSON object's dict, refusing a key given twice."""
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(f"config key {key!r} is given twice")
    return dict(pairs)


def load_config_file(path):
    """The mapping of a JSON or YAML config file; a key given twice is refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            values = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            values = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        reason = files.one_line(error)
        raise ConfigError(f"config file {path} is not valid JSON/YAML: {reason}") from None
    except ConfigError as error:
        raise ConfigError(f"config file {path}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return values


def commented_yaml():
    """A YAML config of every setting at its default, each with its help as a comment."""
    lines = ["# keras-vae run config: every setting at its default (keras-vae config)."]
    defaults = RunConfig().to_dict()
    for name, cls in SECTIONS.items():
        lines += ["", f"{name}:"]
        for field in dataclasses.fields(cls):
            value = yaml.safe_dump(
                defaults[name][field.name], default_flow_style=True, width=1000
            ).strip()
            value = value.removesuffix("\n...").removesuffix(" ...")
            choices = choices_of(field)
            extra = f" [{' | '.join(map(str, choices))}]" if choices else ""
            lines.append(f"  {field.name}: {value}  # {field.metadata['help']}{extra}")
    return "\n".join(lines) + "\n"
