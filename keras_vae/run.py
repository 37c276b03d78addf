"""A training run end to end: ``fitting.fit``, then on the chief ``report.finish``."""

import json
from dataclasses import dataclass
from pathlib import Path

from keras_vae import fitting, report
from keras_vae.model import VAE


@dataclass
class RunResult:
    """The run's model, directory, test metrics and SavedModel; ``exported``: whether this
    call wrote the SavedModel (a finished run resumed keeps the one it has)."""

    model: VAE
    run_dir: Path
    metrics: dict
    export_path: Path | None
    exported: bool = True


def train(config, run_dir=None, resume=False, callbacks=(), verbose=1):
    """Trains (or, with ``resume``, continues) the run of ``config`` in ``run_dir``, then
    evaluates, plots and exports it; returns a ``RunResult`` (on a non-chief worker of a
    multi-worker run: its scratch folder, no metrics and no export)."""
    fitted = fitting.fit(config, run_dir, resume, callbacks, verbose)
    if not fitted.chief:
        return RunResult(fitted.model, fitted.run_dir, {}, None)
    previous = None if fitted.trained else _previous_report(config, fitted.run_dir)
    if previous is not None:
        metrics, export_path = previous
        return RunResult(fitted.model, fitted.run_dir, metrics, export_path, exported=False)
    model, metrics, export_path = report.finish(config, fitted)
    return RunResult(model, fitted.run_dir, metrics, export_path)


def _previous_report(config, run_dir):
    """(metrics, SavedModel path) that the run already wrote, where ``config`` exports; None
    if it has none there."""
    try:
        path = Path(json.loads((run_dir / "export.json").read_text())["saved_model"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    target = (Path(config.output.export_dir) / config.output.export_name).resolve()
    return (metrics, path) if path.parent == target and path.is_dir() else None
