"""A training run end to end: ``fitting.fit``, then on the chief ``report.finish``."""

from dataclasses import dataclass
from pathlib import Path

from keras_vae import fitting, report
from keras_vae.model import VAE


@dataclass
class RunResult:
    model: VAE
    run_dir: Path
    metrics: dict
    export_path: Path | None


def train(config, run_dir=None, resume=False, callbacks=(), verbose=1):
    """Trains (or, with ``resume``, continues) the run of ``config`` in ``run_dir``, then
    evaluates, plots and exports it; returns a ``RunResult`` (on a non-chief worker of a
    multi-worker run: its scratch folder, no metrics and no export)."""
    fitted = fitting.fit(config, run_dir, resume, callbacks, verbose)
    if not fitted.chief:
        return RunResult(fitted.model, fitted.run_dir, {}, None)
    model, metrics, export_path = report.finish(config, fitted)
    return RunResult(model, fitted.run_dir, metrics, export_path)
