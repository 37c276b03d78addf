"""PNG figures of a run: loss curves, reconstructions, prior samples, the latent space,
latent traversals and interpolations.

Each figure is a standalone ``matplotlib.figure.Figure`` rendered straight to its file, so
drawing needs no display, never touches ``pyplot`` and leaves the user's backend as it was.
"""

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import norm

# The offsets t of a latent traversal μ + t·e_j (units of z: N(0, I)'s standard deviations).
TRAVERSAL_OFFSETS = np.linspace(-3, 3, 9)


def _save(fig, path):
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _tile(images, columns, pad=1):
    """[n, H, W, C] → one mosaic of ``columns`` cells a row, ``pad`` pixels between cells
    (padding and blank cells are 0: white in the gray plots)."""
    if images.ndim != 4:
        raise ValueError(
            f"cannot draw data of shape {images.shape[1:]} as images: that "
            f"needs (height, width, channels)"
        )
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + pad) - pad, columns * (w + pad) - pad, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = r * (h + pad), col * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def _show(ax, images, columns, title):
    grid = np.clip(_tile(np.asarray(images), columns), 0, 1)
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray_r", vmin=0, vmax=1)
    else:
        ax.imshow(grid)
    ax.set_title(title)
    ax.axis("off")


def loss_curves(history, path):
    """Train and validation curves of loss, reconstruction and KL (nats per example)."""
    fig = Figure(figsize=(13, 3.5))
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("loss", "reconstruction_loss", "kl_loss")):
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per example")
        ax.set_title(key)
        ax.legend()
    _save(fig, path)


def reconstructions(x, x_hat, path, count=16):
    """Test inputs (top) above their reconstructions E[x | z = μ_φ(x)] (bottom)."""
    fig = Figure(figsize=(count * 0.6, 1.8))
    axes = fig.subplots(2, 1)
    _show(axes[0], x[:count], count, "inputs")
    _show(axes[1], x_hat[:count], count, "reconstructions")
    _save(fig, path)


def samples(images, path, columns=8, title="samples from the prior"):
    """E[x | z] for z ~ p(z), ``columns`` to a row."""
    fig = Figure(figsize=(columns * 0.8, len(images) / columns * 0.8 + 0.4))
    ax = fig.subplots()
    _show(ax, images, columns, title)
    _save(fig, path)


def latent_scatter(z_mean, labels, path):
    """Test means μ_φ(x) in 2-D (first two principal components when d > 2; for d = 1,
    μ against the example's index)."""
    from sklearn.decomposition import PCA

    dims = z_mean.shape[1]
    if dims == 1:
        points, names = np.column_stack([np.arange(len(z_mean)), z_mean[:, 0]]), ("example", "z")
    else:
        points = z_mean if dims == 2 else PCA(2).fit_transform(z_mean)
        names = ("z 1", "z 2") if dims == 2 else ("PC 1", "PC 2")
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    scatter = ax.scatter(
        points[:, 0], points[:, 1], c=labels, cmap=None if labels is None else "tab10", s=6
    )
    if labels is not None:
        fig.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title("posterior means of the test set")
    _save(fig, path)


def manifold(decode_mean, path, count=15):
    """For a 2-D latent: E[x | z] on a grid of z at the prior's quantiles 0.05..0.95."""
    grid = norm.ppf(np.linspace(0.05, 0.95, count))
    z = np.array([[z1, z2] for z2 in grid[::-1] for z1 in grid], "float32")
    fig = Figure(figsize=(8, 8))
    ax = fig.subplots()
    _show(ax, decode_mean(z), count, "decoded latent manifold")
    _save(fig, path)


def latent_traversals(decode_mean, z, dims, path, offsets=TRAVERSAL_OFFSETS):
    """E[x | z + t e_j]: one row per latent dimension j of ``dims`` (in that order), one
    column per offset t of ``offsets``, all from the one latent point z (e.g. μ_φ(x))."""
    z = np.asarray(z, "float32")
    points = np.repeat(z[None, None], len(dims), 0).repeat(len(offsets), 1)
    for row, j in enumerate(dims):
        points[row, :, j] += offsets
    fig = Figure(figsize=(len(offsets) * 0.8 + 0.6, len(dims) * 0.8 + 0.6))
    ax = fig.subplots()
    _show(ax, decode_mean(points.reshape(-1, len(z))), len(offsets), "latent traversals μ + t·e_j")
    _label_cells(ax, [f"{t:+g}" for t in offsets], [f"z {j + 1}" for j in dims])
    _save(fig, path)


def interpolations(decode_mean, z_start, z_end, path, steps=10):
    """E[x | z] along each segment z = (1 − α) z_start + α z_end, α = 0..1 in ``steps``
    steps: one row per pair of latent points (z_start, z_end: [pairs, d])."""
    alpha = np.linspace(0, 1, steps, dtype="float32")[None, :, None]
    points = (1 - alpha) * np.float32(z_start)[:, None] + alpha * np.float32(z_end)[:, None]
    fig = Figure(figsize=(steps * 0.8, len(points) * 0.8 + 0.4))
    ax = fig.subplots()
    _show(
        ax,
        decode_mean(points.reshape(-1, points.shape[-1])),
        steps,
        "interpolations (1 − α) z_a + α z_b",
    )
    _save(fig, path)


def _label_cells(ax, column_labels, row_labels):
    """Tick labels at the centres of the cells of a ``_tile`` grid drawn on ``ax``."""
    ax.axis("on")
    height, width = ax.get_images()[0].get_array().shape[:2]
    cell_w = (width + 1) / len(column_labels)
    cell_h = (height + 1) / len(row_labels)
    ax.set_xticks((np.arange(len(column_labels)) + 0.5) * cell_w - 1, column_labels)
    ax.set_yticks((np.arange(len(row_labels)) + 0.5) * cell_h - 1, row_labels)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
