"""The ``keras-vae`` command: ``train``, ``evaluate``, ``export``, ``sample``, ``config``."""

import argparse
import dataclasses
import json
import sys
import tempfile
import traceback
from pathlib import Path

from keras_vae import files
from keras_vae.config import DataConfig, OutputConfig, RunConfig, commented_yaml, flag_table
from keras_vae.settings import ConfigError, choices_of


def load_run_or_model(path):
    """(model, run config, run directory) from a run directory (its best checkpoint, else
    its last) or a ``.keras`` file; the config and directory are None for a ``.keras`` file
    outside a run's ``checkpoints/``."""
    from keras_vae.rundir import load_checkpoint, run_checkpoint, saved_config

    path = Path(path)
    if path.is_dir():
        run_dir = path
        config = saved_config(run_dir)
        path = run_checkpoint(run_dir)
    elif path.is_file():
        run_dir = path.parent.parent
        if path.parent.name != "checkpoints" or not (run_dir / "config.json").is_file():
            run_dir = None
        config = None if run_dir is None else saved_config(run_dir)
    else:
        raise FileNotFoundError(f"no run directory or .keras model at {path}")
    return load_checkpoint(path), config, run_dir


def _field(cls, name):
    """The declaration of setting ``name`` of the config section ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _positive_int(text):
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}")
    return value


def _add_config_flags(parser):
    """One flag per setting of ``RunConfig``, its help, default and choices from the
    setting's declaration."""
    for flag, (section, field) in flag_table().items():
        choices = choices_of(field)
        default = RunConfig().to_dict()[section][field.name]
        # A yes/no setting's flag alone means true: --conditional is --conditional true.
        switch = {"nargs": "?", "const": "true"} if field.type in (bool, "bool") else {}
        parser.add_argument(
            f"--{flag}",
            dest=f"{section}.{field.name}",
            default=None,
            **switch,
            metavar=field.name.upper() if choices is None else None,
            choices=None if choices is None else [str(c) for c in choices],
            help=f"{field.metadata['help']} (default: {default!r}; section {section})",
        )


def _overrides(args):
    """{section: {key: text}} of the config flags given on the command line."""
    values = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".")
            values.setdefault(section, {})[key] = value
    return values


def _cmd_train(args):
    from keras_vae.run import train
    from keras_vae.rundir import saved_config

    overrides = _overrides(args)
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its saved config; leave out --config")
        if args.run_dir:
            raise ConfigError("--resume names the run directory it continues; leave out --run-dir")
        run_dir = Path(args.resume)
        try:
            base = saved_config(run_dir)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"cannot resume: {error}") from None
    else:
        run_dir = args.run_dir
        base = RunConfig.load(args.config) if args.config else RunConfig()
    config = base.replace(overrides, from_text=True)
    result = train(
        config, run_dir=run_dir, resume=bool(args.resume), verbose=0 if args.quiet else 1
    )
    if result.export_path is None:
        print(f"worker finished; the chief writes the run (scratch: {result.run_dir})")
        return
    test = result.metrics["test"]
    print(f"run directory: {result.run_dir}")
    print(
        f"test ELBO {test['elbo']['mean']:.2f} ± {test['elbo']['se']:.2f} nats, "
        f"log p(x) (K={test['k']}) {test['log_px']['mean']:.2f} ± {test['log_px']['se']:.2f}"
    )
    print(f"SavedModel: {result.export_path}")
    if not result.exported:
        print("nothing to train: the run had finished; its metrics and SavedModel stand")


def _cmd_evaluate(args):
    import numpy as np

    from keras_vae import data as datasets
    from keras_vae import registry
    from keras_vae.evaluate import evaluate
    from keras_vae.fitting import evaluation_copy
    from keras_vae.rundir import TEST_SET_FILE

    model, config, run_dir = load_run_or_model(args.model)
    saved = None if run_dir is None else run_dir / TEST_SET_FILE
    if saved is not None and saved.is_file() and not (args.data or args.binarize or args.data_dir):
        # The run's own test set, so that its scores never depend on redrawing it.
        x, y = datasets.load_test_set(saved)
        data = None if y is None else _probe_source(config)
    else:
        if config is None and not args.data:
            raise ConfigError(
                f"{args.model} is not inside a run directory: name its data with --data"
            )
        overrides = {
            "model": {"likelihood": registry.name_of("likelihood", model.likelihood)},
            "data": {},
        }
        if args.data:
            overrides["data"]["data"] = args.data
        if args.binarize:
            overrides["data"]["binarize"] = args.binarize
        config = (config or RunConfig()).replace(overrides)
        data = datasets.load(
            config.data.data, args.data_dir or config.data.data_dir, config.data.download
        )
        model.check_data(data.x_test)  # before binarizing, which would hide NaN and range
        x, y = evaluation_copy(config, data.x_test), data.y_test
    x, y = x[: args.limit], None if y is None else y[: args.limit]
    probe = {}
    if y is not None and data is not None and data.y_train is not None:
        model.check_data(data.x_train)  # before binarizing, as the test set
        probe = {"x_train": evaluation_copy(config, data.x_train), "y_train": data.y_train}
    # The labels condition a conditional model, and are the probe's targets where it has one.
    labels = y if (probe or model.conditional) else None
    report, scores = evaluate(
        model, x, args.k, args.batch_size, args.chunk_size, args.seed, y=labels, **probe
    )
    report["data"] = config.data.data
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        files.write_text(args.output, text + "\n")
    if args.per_example:
        with files.atomic_path(args.per_example) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                elbo=scores["elbo"],
                elbo_se=scores["elbo_se"],
                kl=scores["kl"],
                log_px=scores["log_px"],
                log_px_se=scores["log_px_se"],
                kl_per_layer=scores["kl_per_layer"],
            )


def _probe_source(config):
    """The run's data source, whose labelled training set the linear probe is fitted to; None,
    with a note on stderr, when it cannot be loaded (the run's saved test set is scored all
    the same)."""
    from keras_vae import data as datasets

    try:
        return datasets.load(config.data.data, config.data.data_dir, config.data.download)
    except (ValueError, OSError, RuntimeError) as error:
        print(
            f"keras-vae: note: no linear probe: the training data of {config.data.data!r} "
            f"could not be loaded ({files.one_line(error, 200)})",
            file=sys.stderr,
        )
        return None


def _cmd_export(args):
    from keras_vae.export import export_model

    model, _, _ = load_run_or_model(args.model)
    print(export_model(model, args.export_dir, args.name))


def _cmd_sample(args):
    import numpy as np

    from keras_vae import plots

    model, _, _ = load_run_or_model(args.model)
    labels = None
    if model.config.num_classes:
        if not args.label:
            raise ValueError(
                f"the model is conditional on {model.config.num_classes} classes: give --label"
            )
        # n/len(labels) samples of each label in turn: --n 80 --label 0 … 9 puts one class
        # in each row of the 8-wide grid.
        per_label = -(-args.n // len(args.label))
        labels = np.repeat(np.asarray(args.label, "int64"), per_label)[: args.n]
        model.check_labels(labels)
    elif model.conditional:
        raise ValueError("the model is conditional on label vectors: sample it from Python")
    elif args.label:
        raise ValueError("--label is for a model conditional on classes; this one is not")
    images = model.sample(args.n, seed=args.seed, labels=labels).numpy()
    if args.output.endswith(".npy"):
        np.save(args.output, images)
    else:
        plots.samples(images, args.output)
    print(args.output)


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-vae", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser(
        "config", help="print a YAML config of every setting at its default, with its help"
    )
    config.set_defaults(func=lambda args: print(commented_yaml(), end=""))

    train = commands.add_parser("train", help="train a VAE (flags override --config)")
    train.add_argument("--config", help="JSON or YAML config file")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument("--run-dir", help="run directory (default: RUNS_DIR/<time>-<data>)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(train)
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="importance-weighted log p(x) and ELBO")
    evaluate.add_argument("model", help="run directory or .keras file")
    evaluate.add_argument("--data", help="data source (default: the run's)")
    evaluate.add_argument("--data-dir", help="TFDS data_dir")
    evaluate.add_argument(
        "--binarize",
        choices=choices_of(_field(DataConfig, "binarize")),
        help="binarize the test set once with a fixed seed (default: the run's)",
    )
    evaluate.add_argument("--k", type=_positive_int, default=1000, help="importance samples K")
    evaluate.add_argument("--batch-size", type=_positive_int, default=100)
    evaluate.add_argument("--chunk-size", type=_positive_int, default=500, help="draws per pass")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--limit", type=_positive_int, help="first N test examples only")
    evaluate.add_argument("--output", help="write the JSON report here")
    evaluate.add_argument("--per-example", help="write per-example scores to this .npz")
    evaluate.set_defaults(func=_cmd_evaluate)

    export = commands.add_parser("export", help="write a SavedModel for TF Serving")
    export.add_argument("model", help="run directory or .keras file")
    export.add_argument("--name", default=_field(OutputConfig, "export_name").default)
    export.add_argument("--export-dir", default=_field(OutputConfig, "export_dir").default)
    export.set_defaults(func=_cmd_export)

    sample = commands.add_parser("sample", help="draw from the prior and decode")
    sample.add_argument("model", help="run directory or .keras file")
    sample.add_argument("--n", type=_positive_int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--output", default="samples.png", help=".png grid or .npy array")
    sample.add_argument(
        "--label",
        type=int,
        nargs="+",
        help="a class-conditional model's classes: n/len(labels) samples of each, in turn",
    )
    sample.set_defaults(func=_cmd_sample)
    return parser


def main(argv=None):
    """Runs the command; bad input gives a one-line message and exit code 2, an unexpected
    error a short message and exit code 1 with its traceback in a file (or, with --debug,
    the traceback itself)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError) as error:
        # ConfigError and the data, checkpoint and model errors are ValueErrors; a path
        # that is a file where a folder is expected (or the reverse) is an OSError.
        if args.debug:
            raise
        print(f"keras-vae: error: {files.one_line(error) or type(error).__name__}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.debug:
            raise
        # MemoryError, or TensorFlow's ResourceExhaustedError: a model or batch too large.
        if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError":
            reason = files.one_line(error, 200)
            print(
                f"keras-vae: error: out of memory{f' ({reason})' if reason else ''}; make the "
                f"model or the batch smaller",
                file=sys.stderr,
            )
            return 2
        with tempfile.NamedTemporaryFile(
            "w", prefix="keras-vae-error-", suffix=".txt", delete=False
        ) as f:
            traceback.print_exc(file=f)
        print(
            f"keras-vae: unexpected error: {type(error).__name__}: "
            f"{files.one_line(error) or type(error).__name__}; "
            f"the traceback is in {f.name} (--debug prints it)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
