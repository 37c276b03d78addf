"""The end of a run: its best checkpoint evaluated (metrics.json), its figures (plots/) and
its SavedModel (export.json)."""

import json

import numpy as np

from keras_vae import files, latent, plots
from keras_vae.evaluate import evaluate
from keras_vae.export import export_model
from keras_vae.rundir import checkpoint_state, load_checkpoint, read_history, run_checkpoint

# K of the importance-weighted log p(x) in a run's final metrics.
FINAL_EVAL_SAMPLES = 100
# The latent traversals show the most active dimensions, at most this many.
TRAVERSAL_DIMS = 8
# The interpolations join test examples 1..n to n + 1..2n, n at most this many.
INTERPOLATION_PAIRS = 4


def finish(config, fitted):
    """(model, metrics, SavedModel path) of a fitted run: its best checkpoint (by validation
    ELBO; without validation data, its last), scored on the test set with K =
    ``FINAL_EVAL_SAMPLES``, plotted and exported."""
    run_dir = fitted.run_dir
    checkpoint = run_checkpoint(run_dir)
    model = load_checkpoint(checkpoint)
    report, _ = evaluate(
        model,
        fitted.x_test,
        num_samples=FINAL_EVAL_SAMPLES,
        seed=config.model.seed,
        # The test labels condition a conditional model, and are the probe's targets
        # where the training set has labels too.
        y=fitted.y_test if model.conditional or fitted.y_train is not None else None,
        x_train=fitted.x_train,
        y_train=fitted.y_train,
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
    """Every figure of a run into ``folder``; those of images only for (H, W, C) data: the
    traversals start from the first test example's E_q[z|x], along its most active
    dimensions, and the interpolations join test examples 1..n to n + 1..2n (an
    autoregressive decoder draws them all along one fixed noise). A conditional
    model decodes them with the first test example's label, and draws samples class by
    class (one row per class) where its labels are classes."""
    folder.mkdir(parents=True, exist_ok=True)
    plots.loss_curves(history, folder / "loss_curves.png")
    y = y_test if model.conditional else None
    z_mean = model.posterior.mean(model.encode_params(x_test, y=y)).numpy()
    classes = y_test if y_test is not None and np.ndim(y_test) == 1 else None
    plots.latent_scatter(z_mean, classes, folder / "latent.png")
    if len(model.data_shape) != 3:
        return
    plots.reconstructions(
        x_test,
        model.reconstruct(x_test[:16], None if y is None else y[:16]).numpy(),
        folder / "reconstructions.png",
    )
    if model.config.num_classes:
        per_class = 8
        labels = np.repeat(np.arange(model.config.num_classes), per_class)
        images = model.sample(len(labels), seed=seed, labels=labels).numpy()
        plots.samples(images, folder / "samples.png", per_class, "samples, one class a row")
    elif not model.conditional:
        plots.samples(model.sample(64, seed=seed).numpy(), folder / "samples.png")

    def decode_mean(z):
        label = None if y is None else np.repeat(y[:1], len(z), axis=0)
        # An autoregressive decoder draws x along one fixed noise for every z, so that the
        # images of a grid differ by z alone (its greedy path is mostly blank).
        noise = None
        if model.autoregressive:
            uniform = np.random.default_rng(seed).uniform(size=(len(z), *model.data_shape))
            noise = uniform.astype("float32")
        return model.decode(z, noise=noise, y=label).mean().numpy()

    if model.latent_dim == 2:
        plots.manifold(decode_mean, folder / "manifold.png")
    most_active = np.argsort(-latent.unit_activity(z_mean), kind="stable")[:TRAVERSAL_DIMS]
    plots.latent_traversals(decode_mean, z_mean[0], most_active, folder / "traversals.png")
    pairs = min(INTERPOLATION_PAIRS, len(z_mean) // 2)
    if pairs:
        plots.interpolations(
            decode_mean, z_mean[:pairs], z_mean[pairs : 2 * pairs], folder / "interpolations.png"
        )
