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
        data.load("tfds:mnist", data_dir=str(tmp_path), download=True)


def test_npz_source_scales_and_adds_channels(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(10, 4, 4), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x_train, x_test=x_test, y_test=np.arange(3))
    loaded = data.load(f"npz:{tmp_path / 'd.npz'}")
    np.testing.assert_array_equal(loaded.x_train[..., 0], x_train / np.float32(255))
    assert loaded.y_train is None and list(loaded.y_test) == [0, 1, 2]


def test_integer_pixels_scale_by_their_depth_or_are_refused():
    sixteen = np.array([[[0, 32896, 65535]]], np.uint16)
    np.testing.assert_allclose(
        data.to_unit_interval(sixteen)[..., 0], [[[0.0, 0.50196, 1.0]]], atol=1e-5
    )
    eight = np.array([[[0, 128, 255]]], np.int64)
    np.testing.assert_allclose(data.to_unit_interval(eight)[..., 0], [[[0.0, 128 / 255, 1.0]]])
    with pytest.raises(ValueError, match=r"integer pixels must be 0..255 .*got int32 values in"):
        data.to_unit_interval(np.array([[[0, 300]]], np.int32))


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


# ------------------------------------------------------------------ bad input, table-driven
def _keras_npz(path, **arrays):
    rng = np.random.default_rng(0)
    layout = {
        "x_train": rng.integers(0, 256, size=(10, 4, 4), dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8),
    }
    np.savez(path, **(layout | arrays))


def _flipped(path, pattern):
    """Flips one byte in the middle of the first occurrence of ``pattern`` in the file."""
    raw = bytearray(path.read_bytes())
    at = raw.index(pattern) + len(pattern) // 2
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _npy_file(path):
    with path.open("wb") as file:
        np.save(file, np.zeros((3, 4, 4)))


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zip_members(path, **members):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in members.items():
            archive.writestr(f"{name}.npy", raw)


def _npy_header_only(path):
    """An npz whose x_train member is a valid .npy header promising more data than it holds."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((10, 4, 4)))
    test = io.BytesIO()
    np.save(test, np.zeros((3, 4, 4)))
    _zip_members(path, x_train=buffer.getvalue()[:200], x_test=test.getvalue())


def _corrupt_first_member(path):
    """Flips a byte 40 bytes into the stored data of the zip archive's first member."""
    raw = bytearray(path.read_bytes())
    name_length, extra_length = np.frombuffer(bytes(raw[26:30]), "<u2")
    raw[30 + int(name_length) + int(extra_length) + 40] ^= 0xFF
    path.write_bytes(bytes(raw))


def _compressed_corrupt(path):
    x = np.random.default_rng(1).uniform(size=(50, 4, 4))
    np.savez_compressed(path, x_train=x, x_test=x[:3])
    _corrupt_first_member(path)


NPZ_CASES = {
    "npy file": (_npy_file, "not an npz archive"),
    "text file": (lambda p: p.write_text("x_train,x_test\n1,2\n"), "not an npz archive"),
    "empty file": (lambda p: p.write_bytes(b""), "not an npz archive"),
    "truncated npz": (lambda p: (_keras_npz(p), _truncated(p)), "not an npz archive"),
    "bad CRC": (
        lambda p: (
            _keras_npz(p, x_train=np.full((10, 4, 4), 7, np.uint8)),
            _flipped(p, bytes([7]) * 160),
        ),
        r"x_train: Bad CRC-32",
    ),
    "corrupt deflate stream": (_compressed_corrupt, r"x_train: Error -3 while decompressing"),
    "member not .npy": (
        lambda p: _zip_members(p, x_train=b"garbage", x_test=b"more garbage"),
        r"x_train: not a \.npy array",
    ),
    "truncated member": (_npy_header_only, "x_train: EOF: reading array data"),
    "pickled objects": (
        lambda p: _keras_npz(p, x_train=np.array([{"a": 1}, None], dtype=object)),
        r"x_train: Object arrays cannot be loaded when allow_pickle=False",
    ),
    "complex x_train": (
        lambda p: _keras_npz(p, x_train=np.ones((10, 4, 4)) * (0.5 + 0.5j)),
        r": x_train is complex \(complex128\)",
    ),
    "complex x_test": (
        lambda p: _keras_npz(p, x_test=np.ones((3, 4, 4), np.complex64)),
        r": x_test is complex \(complex64\)",
    ),
    "string x_train": (
        lambda p: _keras_npz(p, x_train=np.full((10, 4, 4), "0.5")),
        r": x_train has dtype <U3; expected numbers",
    ),
    "datetime x_test": (
        lambda p: _keras_npz(p, x_test=np.zeros((3, 4, 4), "datetime64[s]")),
        r": x_test has dtype datetime64\[s\]",
    ),
    "string labels": (
        lambda p: _keras_npz(p, y_train=np.array(["cat"] * 10)),
        r": y_train has dtype <U3",
    ),
    "1-D x_train": (
        lambda p: _keras_npz(p, x_train=np.zeros(10)),
        r"x_train has shape \(10,\); expected one example per row",
    ),
    "labels too few": (
        lambda p: _keras_npz(p, y_train=np.arange(9)),
        r": y_train has shape \(9,\); expected one label per example of x_train, shape \(10,\)",
    ),
    "labels of three axes": (
        lambda p: _keras_npz(p, y_test=np.zeros((3, 2, 2))),
        r": y_test has shape \(3, 2, 2\); expected one label per example of x_test",
    ),
}


@pytest.mark.parametrize("case", NPZ_CASES)
def test_bad_npz_files_give_one_line_errors_naming_the_file(tmp_path, case):
    write, message = NPZ_CASES[case]
    path = tmp_path / "d.npz"
    write(path)
    with pytest.raises(ValueError, match=r"npz data file .*d\.npz.*" + message) as error:
        data.load(f"npz:{path}")
    assert "\n" not in str(error.value)


def test_npz_labels_and_float_data_pass_through(tmp_path):
    x_train = np.random.default_rng(0).uniform(size=(10, 4, 4, 2))
    _keras_npz(tmp_path / "d.npz", x_train=x_train, x_test=x_train[:3], y_train=np.arange(10))
    loaded = data.load(f"npz:{tmp_path / 'd.npz'}")
    np.testing.assert_array_equal(loaded.x_train, x_train.astype(np.float32))
    np.testing.assert_array_equal(loaded.y_train, np.arange(10))


def _gray8(size=8, value=None):
    rng = np.random.default_rng(size)
    pixels = rng.integers(0, 256, (size, size), dtype=np.uint8) if value is None else None
    return Image.fromarray(pixels if value is None else np.full((size, size), value, np.uint8))


def _truncated_image(path, fmt):
    _gray8(16).save(path, fmt)
    _truncated(path)


def _tiff_named(path, pixels):
    """PIL reads a file by its content, whatever its suffix: a TIFF saved as *.png."""
    Image.fromarray(pixels).save(path, "TIFF")


IMAGE_CASES = {
    "not an image": (lambda p: p.write_text("hello"), "cannot identify image file"),
    "truncated PNG": (lambda p: _truncated_image(p, "PNG"), "image file is truncated"),
    "truncated JPEG": (lambda p: _truncated_image(p, "JPEG"), "Truncated File Read"),
    "broken PNG header": (
        lambda p: (_gray8().save(p), _flipped(p, b"IHDR")),
        "cannot identify image file",
    ),
    # MAX_IMAGE_PIXELS is lowered to 40: 8×8 only draws PIL's warning, 16×16 its error.
    "decompression bomb warning": (lambda p: _gray8(8).save(p), "exceeds limit of 40 pixels"),
    "decompression bomb": (lambda p: _gray8(16).save(p), "exceeds limit of 80 pixels"),
    "32-bit values above 16 bits": (
        lambda p: _tiff_named(p, np.array([[0, 70000], [5, 6]], np.int32)),
        r"has 32-bit pixel values 0\.\.70000, outside the 16-bit range 0\.\.65535",
    ),
    "negative 32-bit values": (
        lambda p: _tiff_named(p, np.array([[-3, 7], [5, 6]], np.int32)),
        r"has 32-bit pixel values -3\.\.7",
    ),
    "floating-point image": (
        lambda p: _tiff_named(p, np.full((2, 2), 0.5, np.float32)),
        r"has floating-point pixels \(mode F\)",
    ),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_images_give_one_line_errors_naming_the_file(tmp_path, monkeypatch, case):
    write, message = IMAGE_CASES[case]
    for i in range(3):
        Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / f"good{i}.png")
    write(tmp_path / "bad.png")
    if case.startswith("decompression"):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(ValueError, match=r"image .*bad\.png.*" + message) as error:
        data.load(f"images:{tmp_path}")
    assert "\n" not in str(error.value)


def test_images_of_different_shapes_are_named(tmp_path):
    _gray8(8).save(tmp_path / "a.png")
    _gray8(9).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    with pytest.raises(
        ValueError,
        match=r"differ in shape: \(8, 8, 1\) \(a\.png\), \(8, 8, 3\) \(c\.png\), "
        r"\(9, 9, 1\) \(b\.png\)$",
    ):
        data.load(f"images:{tmp_path}")


def _all_examples(loaded):
    return np.concatenate([loaded.x_train, loaded.x_test])


def _match(loaded, expected):
    """Pairs every loaded example with the expected image equal to it, each used once."""
    examples = _all_examples(loaded)
    assert len(examples) == len(expected)
    used = set()
    for example in examples:
        equal = [i for i, e in enumerate(expected) if np.array_equal(example, e)]
        assert len(equal) == 1 and equal[0] not in used
        used.add(equal[0])


def test_16_bit_images_are_scaled_by_65535(tmp_path):
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 65536, (6, 6), dtype=np.uint16) for _ in range(10)]
    values[0][0, :3] = [0, 65535, 1]  # the ends of the range, and one step above 0
    for i, pixels in enumerate(values[:6]):
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")  # mode I;16
    for i, pixels in enumerate(values[6:8], 6):
        _tiff_named(tmp_path / f"{i}.png", pixels.astype(">u2"))  # mode I;16B
    for i, pixels in enumerate(values[8:], 8):
        _tiff_named(tmp_path / f"{i}.png", pixels.astype(np.int32))  # mode I
    assert {Image.open(tmp_path / f"{i}.png").mode for i in (0, 6, 8)} == {"I;16", "I;16B", "I"}
    loaded = data.load(f"images:{tmp_path}")
    assert loaded.x_train.dtype == np.float32 and loaded.x_train.shape == (9, 6, 6, 1)
    _match(loaded, [np.float32(v / 65535.0)[..., None] for v in values])
    assert _all_examples(loaded).max() == 1.0


def test_8_bit_images_are_scaled_by_255(tmp_path):
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 256, (5, 5, 3), dtype=np.uint8) for _ in range(4)]
    for i, pixels in enumerate(values):
        Image.fromarray(pixels).save(tmp_path / f"{i}.bmp")
    _match(data.load(f"images:{tmp_path}"), [np.float32(v / 255.0) for v in values])


def test_mixed_bit_depths_are_scaled_each_by_its_own(tmp_path):
    for i in range(3):
        _gray8(4, 128).save(tmp_path / f"eight{i}.png")
        Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(tmp_path / f"sixteen{i}.png")
    examples = _all_examples(data.load(f"images:{tmp_path}"))
    assert examples.shape == (6, 4, 4, 1)
    # 128 / 255 = 32896 / 65535 = 0.50196…
    np.testing.assert_allclose(examples, 128 / 255, rtol=0, atol=1e-6)


def test_saved_test_set_round_trips(tmp_path):
    x = np.random.default_rng(0).uniform(size=(5, 3, 3, 1)).astype("float32")
    data.save_test_set(tmp_path / "a.npz", x, np.arange(5))
    data.save_test_set(tmp_path / "b.npz", x)
    x_a, y_a = data.load_test_set(tmp_path / "a.npz")
    np.testing.assert_array_equal(x_a, x)
    np.testing.assert_array_equal(y_a, np.arange(5))
    x_b, y_b = data.load_test_set(str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(x_b, x)
    assert y_b is None


def _saved_test_set(path, **arrays):
    x = np.random.default_rng(0).uniform(size=(20, 3, 3, 1)).astype("float32")
    np.savez_compressed(path, **({"x": x, "y": np.arange(20)} | arrays))


TEST_SET_CASES = {
    "not an npz": (lambda p: p.write_text("x"), "not an npz archive"),
    "truncated": (lambda p: (_saved_test_set(p), _truncated(p)), "not an npz archive"),
    "corrupt": (
        lambda p: (_saved_test_set(p), _corrupt_first_member(p)),
        "x: Error -3 while decompressing data",
    ),
    "lacks x": (lambda p: np.savez(p, y=np.arange(3)), r"it lacks the x array, it has \['y'\]"),
    "x not float32": (
        lambda p: _saved_test_set(p, x=np.zeros((20, 3, 3, 1))),
        r"x is float64 of shape \(20, 3, 3, 1\)",
    ),
    "x of rank 1": (
        lambda p: _saved_test_set(p, x=np.zeros(20, np.float32)),
        r"x is float32 of shape \(20,\)",
    ),
    "y of another length": (
        lambda p: _saved_test_set(p, y=np.arange(19)),
        r"y has shape \(19,\), not one label per example \(20,\)",
    ),
    "pickled x": (
        lambda p: np.savez(p, x=np.array([None, 1], dtype=object)),
        "x: Object arrays cannot be loaded",
    ),
}


@pytest.mark.parametrize("case", TEST_SET_CASES)
def test_damaged_saved_test_set_is_named(tmp_path, case):
    write, message = TEST_SET_CASES[case]
    path = tmp_path / "test_set.npz"
    write(path)
    with pytest.raises(
        ValueError, match=r"the run's test set .*test_set\.npz is damaged: .*" + message
    ) as error:
        data.load_test_set(path)
    assert str(error.value).endswith("; score another data set with --data")
    assert "\n" not in str(error.value)


def test_missing_saved_test_set_is_named(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"the run's test set .*test_set\.npz is missing; score another data set with --data",
    ):
        data.load_test_set(tmp_path / "test_set.npz")


def _no_download(monkeypatch):
    """Makes any download attempt fail the test, and returns the list of attempts."""
    attempts = []

    def download(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("tried to download")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    return attempts


def test_tfds_without_download_fails_at_once_when_not_prepared(monkeypatch, tmp_path):
    attempts = _no_download(monkeypatch)
    with pytest.raises(ValueError) as error:
        data.load("tfds:mnist", data_dir=str(tmp_path), download=False)
    assert str(error.value) == (
        f"TFDS data set 'mnist' is not prepared in {tmp_path} and downloading is off; "
        f"prepare it with `tfds build mnist --data_dir {tmp_path}` or allow downloading"
    )
    assert attempts == []


def test_tfds_without_download_reads_prepared_data():
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        offline = data.load("tfds:mnist", download=False)
        default = data.load("tfds:mnist")
    np.testing.assert_array_equal(offline.x_train, default.x_train)
    np.testing.assert_array_equal(offline.y_test, default.y_test)
    assert offline.x_test.shape == (5, 28, 28, 1)


def test_tfds_unknown_data_set_is_named(monkeypatch, tmp_path):
    attempts = _no_download(monkeypatch)
    with pytest.raises(ValueError) as error:
        data.load("tfds:no_such_data_set", data_dir=str(tmp_path))
    assert str(error.value) == (
        "unknown TFDS data set 'no_such_data_set' (tfds.list_builders() names the known ones)"
    )
    assert attempts == []
