"""Data sources and the training pipeline."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from keras_vae import data


def test_digits_split_is_fixed_and_in_unit_interval():
    a, b = data.load("digits"), data.load("digits")
    assert a.x_train.shape == (1437, 8, 8, 1) and a.x_test.shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.x_train.min() == 0.0 and a.x_train.max() == 1.0
    assert set(np.unique(a.y_test)) == set(range(10))


def test_tfds_source_through_mock_data():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        loaded = data.load("tfds:mnist")
        reference = next(iter(tfds.load("mnist", split="train").batch(12).as_numpy_iterator()))
    assert loaded.x_train.shape == (12, 28, 28, 1) and loaded.x_train.dtype == np.float32
    np.testing.assert_array_equal(loaded.x_train, reference["image"] / np.float32(255.0))
    np.testing.assert_array_equal(loaded.y_train, reference["label"])


def test_tfds_failed_download_says_so(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
    with pytest.raises(RuntimeError, match=r"Could not load TFDS data set 'mnist'.*resolve"):
        data.load("tfds:mnist", data_dir=str(tmp_path))


def test_npz_source_scales_and_adds_channels(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(10, 4, 4), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x_train, x_test=x_test, y_test=np.arange(3))
    loaded = data.load(f"npz:{tmp_path / 'd.npz'}")
    np.testing.assert_array_equal(loaded.x_train[..., 0], x_train / np.float32(255))
    assert loaded.y_train is None and list(loaded.y_test) == [0, 1, 2]


def test_npz_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="npz data file not found"):
        data.load(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"lacks \['x_test', 'x_train'\]"):
        data.load(f"npz:{tmp_path / 'bad.npz'}")
    (tmp_path / "corrupt.npz").write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="cannot read npz data file .*corrupt.npz"):
        data.load(f"npz:{tmp_path / 'corrupt.npz'}")
    with pytest.raises(ValueError, match="Unknown data source 'mnist'"):
        data.load("mnist")


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    loaded = data.load(f"images:{tmp_path}")
    assert loaded.x_train.shape == (18, 8, 8, 1) and loaded.x_test.shape == (2, 8, 8, 1)
    assert set(loaded.y_train) == {0, 1}
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        data.load(f"images:{tmp_path / 'nope'}")


def _stream(dataset):
    return [batch.numpy() for batch in dataset]


def test_training_stream_resumes_with_the_same_batches():
    x = np.random.default_rng(0).uniform(size=(10, 2, 2, 1)).astype("float32")
    full = _stream(data.training_dataset(x, 4, seed=3, binarize=True, initial_epoch=0, epochs=4))
    resumed = _stream(data.training_dataset(x, 4, seed=3, binarize=True, initial_epoch=2, epochs=4))
    steps = data.steps_per_epoch(10, 4)
    assert steps == 3 and len(full) == 4 * steps
    # Autotuning off: on 2 cores it halved the training speed of many runs (data.py).
    assert data.training_dataset(x, 4, 3, True, 0, 1).options().autotune.enabled is False
    for a, b in zip(full[2 * steps :], resumed):
        np.testing.assert_array_equal(a, b)


def test_each_epoch_is_a_permutation_and_binarization_is_fresh():
    x = np.linspace(0.05, 0.95, 200, dtype="float32").reshape(200, 1, 1, 1)
    plain = _stream(data.training_dataset(x, 64, 0, False, 0, 2))
    epoch0, epoch1 = np.concatenate(plain[:4]), np.concatenate(plain[4:])
    np.testing.assert_array_equal(np.sort(epoch0.ravel()), x.ravel())
    assert not np.array_equal(epoch0, epoch1)  # reshuffled
    # One batch per epoch: 200 epochs of binarized draws and, with the same seed, the same
    # orders without binarization (to put each draw back in its example's place).
    draws = np.stack(_stream(data.training_dataset(x, 200, 0, True, 0, 200)))[..., 0, 0, 0]
    orders = np.stack(_stream(data.training_dataset(x, 200, 0, False, 0, 200)))[..., 0, 0, 0]
    assert set(np.unique(draws)) == {0.0, 1.0}
    assert len({tuple(d) for d in draws}) == 200  # a fresh draw each epoch
    # E[x_bin] = x: mean over 200 epochs of a value at p has SE ≤ 0.036
    placed = [d[np.argsort(o)] for d, o in zip(draws, orders)]
    means = np.mean(placed, axis=0)
    assert np.max(np.abs(means - x.ravel())) < 0.16
    assert abs(means.mean() - x.mean()) < 0.01


def test_binarize_once_draws_bernoulli_x_with_a_fixed_seed():
    x = np.tile(np.array([0.1, 0.5, 0.9], "float32"), (4000, 1))
    once = data.binarize_once(x)
    np.testing.assert_array_equal(once, data.binarize_once(x))
    assert not np.array_equal(once, data.binarize_once(x, seed=1))
    assert set(np.unique(once)) == {0.0, 1.0}
    # P(x_bin = 1) = x: column means within 3 standard errors (√(0.25 / 4000) ≈ 0.008).
    np.testing.assert_allclose(once.mean(0), [0.1, 0.5, 0.9], atol=0.025)


def test_integer_data_already_binary_is_kept():
    x = np.array([[[0, 1], [1, 0]]], np.uint8)
    np.testing.assert_array_equal(data.to_unit_interval(x)[..., 0], x)


def test_palette_images_give_intensities(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    for i in range(4):
        Image.fromarray(gray).convert("P").save(tmp_path / f"{i}.png")
    loaded = data.load(f"images:{tmp_path}")
    assert loaded.x_train.shape[-1] == 3
    np.testing.assert_allclose(loaded.x_train[0, ..., 0], gray / 255.0, atol=2 / 255)
