"""The end of a run: its best checkpoint evaluated (metrics.json), its figures (plots/) and
its SavedModel (export.json)."""

import json

from keras_vae import files, plots
from keras_vae.evaluate import evaluate
from keras_vae.export import export_model
from keras_vae.rundir import checkpoint_state, load_checkpoint, read_history, run_checkpoint

# K of the importance-weighted log p(x) in a run's final metrics.
FINAL_EVAL_SAMPLES = 100


def finish(config, fitted):
    """(model, metrics, SavedModel path) of a fitted run: its best checkpoint (by validation
    ELBO; without validation data, its last), scored on the test set with K =
    ``FINAL_EVAL_SAMPLES``, plotted and exported."""
    run_dir = fitted.run_dir
    checkpoint = run_checkpoint(run_dir)
    model = load_checkpoint(checkpoint)
    report, _ = evaluate(
        model, fitted.x_test, num_samples=FINAL_EVAL_SAMPLES, seed=config.model.seed
    )
    metrics = {
        "epochs_completed": checkpoint_state(run_dir / "checkpoints" / "last.keras")[
            "epochs_completed"
        ],
        "checkpoint": checkpoint.name,
        "test": report,
    }
    files.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if config.output.plots:
        write_plots(
            model,
            run_dir / "plots",
            read_history(run_dir / "history.csv"),
            fitted.x_test,
            fitted.y_test,
            config.model.seed,
        )
    export_path = export_model(model, config.output.export_dir, config.output.export_name)
    files.write_text(
        run_dir / "export.json",
        json.dumps({"saved_model": str(export_path.resolve())}, indent=2) + "\n",
    )
    return model, metrics, export_path


def write_plots(model, folder, history, x_test, y_test, seed=0):
    """Every figure of a run into ``folder``; those of images only for (H, W, C) data."""
    folder.mkdir(parents=True, exist_ok=True)
    plots.loss_curves(history, folder / "loss_curves.png")
    z_mean = model.posterior.mean(model.encode_params(x_test)).numpy()
    plots.latent_scatter(z_mean, y_test, folder / "latent.png")
    if len(model.data_shape) != 3:
        return
    plots.reconstructions(
        x_test, model.reconstruct(x_test[:16]).numpy(), folder / "reconstructions.png"
    )
    plots.samples(model.sample(64, seed=seed).numpy(), folder / "samples.png")
    if model.latent_dim == 2:
        plots.manifold(lambda z: model.decode(z).mean().numpy(), folder / "manifold.png")
