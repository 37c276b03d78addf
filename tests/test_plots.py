"""The run's figures: drawn without pyplot or a backend switch, written as readable PNGs."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.stats import norm

from keras_vae import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAB10 = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def read_png(path):
    """The file's RGB pixels in [0, 1], after checking it is a PNG of some substance."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 2000, (path, len(data))
    image = imread(path)
    assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] in (3, 4)
    assert min(image.shape[:2]) > 50
    return image[..., :3]


def darkness(image):
    """Per pixel: 1 for black, 0 for white."""
    return 1 - image.mean(axis=-1)


def has_color(image, color, tolerance=0.02, at_least=3):
    rgb = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return np.sum(np.all(np.abs(image - rgb) < tolerance, axis=-1)) >= at_least


def test_import_and_drawing_keep_the_backend_and_never_load_pyplot(tmp_path):
    check = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        import numpy as np
        import keras_vae.plots as plots
        facts = {"pyplot after import": "matplotlib.pyplot" in sys.modules}
        out = Path(sys.argv[1])
        plots.loss_curves({"loss": [3.0, 2.0], "reconstruction_loss": [2.0, 1.5],
                           "kl_loss": [1.0, 0.5]}, out / "loss.png")
        images = np.random.default_rng(0).uniform(size=(16, 6, 6, 1))
        plots.reconstructions(images, images, out / "reconstructions.png")
        plots.samples(images, out / "samples.png")
        plots.latent_scatter(np.random.default_rng(0).normal(size=(30, 3)), np.arange(30) % 10,
                             out / "latent.png")
        plots.manifold(lambda z: np.ones((len(z), 4, 4, 1)), out / "manifold.png", count=5)
        decode = lambda z: np.ones((len(z), 4, 4, 1))
        plots.latent_traversals(decode, np.zeros(3), [2, 0], out / "traversals.png")
        plots.interpolations(decode, np.zeros((2, 3)), np.ones((2, 3)), out / "interpolations.png")
        facts["pyplot after drawing"] = "matplotlib.pyplot" in sys.modules
        facts["keras loaded"] = "keras" in sys.modules  # Keras itself imports pyplot
        import matplotlib
        facts["backend"] = matplotlib.get_backend()
        print(json.dumps(facts))
    """)
    env = dict(os.environ, MPLBACKEND="svg")
    result = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.splitlines()[-1])
    assert facts["backend"] == "svg", facts
    assert not facts["pyplot after import"] and not facts["pyplot after drawing"], facts
    for name in (
        "loss",
        "reconstructions",
        "samples",
        "latent",
        "manifold",
        "traversals",
        "interpolations",
    ):
        read_png(tmp_path / f"{name}.png")


@pytest.mark.parametrize("pad", [1, 2])
def test_tile_places_every_image_element_by_element(pad):
    images = np.random.default_rng(0).uniform(0.1, 1, size=(7, 4, 5, 2)).astype("float32")
    columns, (n, h, w, c) = 3, images.shape
    grid = plots._tile(images, columns, pad=pad)
    assert grid.dtype == images.dtype
    assert grid.shape == (3 * (h + pad) - pad, columns * (w + pad) - pad, c)
    covered = np.zeros(grid.shape[:2], bool)
    for k in range(n):
        r, col = divmod(k, columns)
        for i in range(h):
            for j in range(w):
                y, x = r * (h + pad) + i, col * (w + pad) + j
                np.testing.assert_array_equal(grid[y, x], images[k, i, j], err_msg=(k, i, j))
                covered[y, x] = True
    assert covered.sum() == n * h * w
    # Padding and the two blank cells of the last row are 0.
    np.testing.assert_array_equal(grid[~covered], 0)


def test_tile_refuses_data_that_are_not_images():
    with pytest.raises(ValueError, match=r"shape \(64,\) as images"):
        plots._tile(np.zeros((3, 64)), 8)


@pytest.mark.parametrize("validation", [True, False])
def test_loss_curves(tmp_path, validation):
    history = {
        "loss": [3.0, 2.0, 1.8],
        "reconstruction_loss": [2.0, 1.5, 1.4],
        "kl_loss": [1.0, 0.5, 0.4],
    }
    if validation:
        history.update(
            {f"val_{k}": [v * 1.1 for v in values] for k, values in list(history.items())}
        )
    plots.loss_curves(history, tmp_path / "loss.png")
    image = read_png(tmp_path / "loss.png")
    height, width = image.shape[:2]
    assert 2.5 < width / height < 5  # three panels side by side
    assert has_color(image, TAB10[0], at_least=50)  # train curves
    assert has_color(image, TAB10[1], at_least=50) == validation


def test_reconstructions_draw_inputs_above_reconstructions(tmp_path):
    x, x_hat = np.zeros((20, 7, 7, 1)), np.ones((20, 7, 7, 1))  # white inputs, black outputs
    plots.reconstructions(x, x_hat, tmp_path / "rec.png")
    dark = darkness(read_png(tmp_path / "rec.png")) > 0.8
    top, bottom = np.array_split(dark, 2)
    assert bottom.mean() > 0.2 and top.mean() < 0.05, (top.mean(), bottom.mean())


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_samples_draw_the_images(tmp_path, value):
    plots.samples(np.full((16, 8, 8, 1), value), tmp_path / "samples.png")
    dark = (darkness(read_png(tmp_path / "samples.png")) > 0.8).mean()
    assert dark > 0.4 if value else dark < 0.05, dark


def test_samples_draw_color_images(tmp_path):
    images = np.zeros((8, 6, 6, 3))
    images[..., 1] = 1  # pure green
    plots.samples(images, tmp_path / "samples.png", columns=4)
    image = read_png(tmp_path / "samples.png")
    assert np.mean(np.all(np.abs(image - [0, 1, 0]) < 0.02, axis=-1)) > 0.3


@pytest.mark.parametrize("labelled", [True, False])
def test_latent_scatter_colors_by_label(tmp_path, labelled):
    z_mean = np.random.default_rng(0).normal(size=(200, 2))
    labels = np.arange(200) % 10 if labelled else None
    plots.latent_scatter(z_mean, labels, tmp_path / "latent.png")
    image = read_png(tmp_path / "latent.png")
    assert has_color(image, TAB10[0])
    # With labels every class color shows (in the points and in the colorbar).
    assert all(has_color(image, color) for color in TAB10) == labelled


def test_manifold_decodes_the_prior_quantile_grid(tmp_path):
    count, seen = 7, []
    quantiles = norm.ppf(np.linspace(0.05, 0.95, count))

    def decode_mean(z):
        seen.append(z)
        # Black where z₁ > 0 (the right of the grid), white elsewhere.
        return np.broadcast_to((z[:, 0] > 0)[:, None, None, None], (len(z), 5, 5, 1)) * 1.0

    plots.manifold(decode_mean, tmp_path / "manifold.png", count=count)
    (z,) = seen
    assert z.dtype == np.float32 and z.shape == (count * count, 2)
    for row in range(count):  # rows from z₂'s top quantile down, z₁ rising along each row
        for col in range(count):
            np.testing.assert_allclose(
                z[row * count + col], [quantiles[col], quantiles[count - 1 - row]], rtol=1e-6
            )
    dark = darkness(read_png(tmp_path / "manifold.png")) > 0.8
    left, right = np.array_split(dark, 2, axis=1)
    assert right.mean() > 0.3 and left.mean() < 0.05, (left.mean(), right.mean())


@pytest.mark.parametrize("dims", [1, 2, 5])
def test_latent_scatter_draws_any_number_of_latent_units(dims, tmp_path):

    z_mean = np.random.default_rng(0).normal(size=(50, dims))
    plots.latent_scatter(z_mean, np.arange(50) % 10, tmp_path / "latent.png")
    assert (tmp_path / "latent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latent_traversals_move_one_dimension_per_row(tmp_path):
    z, dims, seen = np.array([0.5, -1.0, 2.0]), [2, 0], []

    def decode_mean(points):
        seen.append(points)
        # Black where the point lies above z in its moved coordinate: the right half.
        return (
            np.broadcast_to(
                (points.sum(1) > z.sum() + 1e-6)[:, None, None, None], (len(points), 5, 5, 1)
            )
            * 1.0
        )

    plots.latent_traversals(decode_mean, z, dims, tmp_path / "traversals.png")
    (points,) = seen
    offsets = plots.TRAVERSAL_OFFSETS
    assert points.dtype == np.float32 and points.shape == (len(dims) * len(offsets), 3)
    for row, j in enumerate(dims):  # row by row, the offsets t along each row
        for col, t in enumerate(offsets):
            expected = z.copy()
            expected[j] += t
            np.testing.assert_allclose(points[row * len(offsets) + col], expected, rtol=1e-6)
    dark = darkness(read_png(tmp_path / "traversals.png")) > 0.8
    left, right = np.array_split(dark, 2, axis=1)
    assert right.mean() > 0.2 and left.mean() < 0.05, (left.mean(), right.mean())


def test_interpolations_decode_the_segments_between_pairs(tmp_path):
    start, end, seen = np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [1.0, 3.0]]), []

    def decode_mean(points):
        seen.append(points)
        # Black in the second half of each segment (α > ½): the right of the figure.
        alpha = np.concatenate([points[:5, 0] / 2, (points[5:, 1] - 1) / 2])
        return np.broadcast_to((alpha > 0.5)[:, None, None, None], (len(points), 5, 5, 1)) * 1.0

    plots.interpolations(decode_mean, start, end, tmp_path / "interpolations.png", steps=5)
    (points,) = seen
    assert points.dtype == np.float32 and points.shape == (10, 2)
    for pair in range(2):
        for step, alpha in enumerate(np.linspace(0, 1, 5)):
            np.testing.assert_allclose(
                points[pair * 5 + step], (1 - alpha) * start[pair] + alpha * end[pair], rtol=1e-6
            )
    dark = darkness(read_png(tmp_path / "interpolations.png")) > 0.8
    left, right = np.array_split(dark, 2, axis=1)
    assert right.mean() > 0.2 and left.mean() < 0.05, (left.mean(), right.mean())
