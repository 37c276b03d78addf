"""Data sets as arrays in [0, 1] of shape [N, H, W, C], and the tf.data training pipeline.

Sources (the ``data`` config key):
- ``digits``: scikit-learn's bundled 8×8 digits (offline), a fixed 1437/360 split.
- ``tfds:NAME[:TRAIN_SPLIT[:TEST_SPLIT]]``: any TFDS image data set through ``tfds.load``.
- ``npz:PATH``: Keras layout, ``x_train`` and ``x_test`` (``y_train``/``y_test`` optional:
  one label per example, a class [N] or a vector [N, C]).
- ``images:DIR``: a folder of images (sub-folders as labels), a fixed 90/10 split.
"""

import hashlib
import math
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_vae import files

# The evaluation copy of binarized data is drawn once with this seed, the same for every run,
# so that every model is scored on the same binary test set.
TEST_BINARIZATION_SEED = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass
class Data:
    """Train/test arrays in [0, 1] (float32, [N, H, W, C]) and labels (or None)."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def shape(self):
        return self.x_train.shape[1:]


def to_unit_interval(x):
    """Integer pixels → [0, 1] float32: 16-bit (uint16) divided by 65535, other integers by
    255 (integer data already in {0, 1} is kept; values above 255 are refused); images get a
    channel axis if they lack one."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer) and x.max(initial=0) > 1:
        if x.dtype == np.uint16:
            x = x / 65535.0
        elif x.max() > 255 or x.min() < 0:
            raise ValueError(
                f"integer pixels must be 0..255 (8-bit) or uint16; got {x.dtype} values in "
                f"[{x.min()}, {x.max()}]"
            )
        else:
            x = x / 255.0
    x = x.astype("float32")
    return x[..., None] if x.ndim == 3 else x


def load(spec, data_dir=None, download=False):
    """The ``Data`` for a source spec (see the module docstring). With ``download=False`` a
    TFDS data set must already be prepared in ``data_dir``."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _digits()
    if kind == "tfds" and arg:
        return _tfds(arg, data_dir, download)
    if kind == "npz" and arg:
        return _npz(Path(arg))
    if kind == "images" and arg:
        return _images(Path(arg))
    raise ValueError(
        f"Unknown data source {spec!r}; expected digits, tfds:NAME[:TRAIN[:TEST]], npz:PATH "
        f"or images:DIR."
    )


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.images[order] / 16.0).astype("float32")[..., None]
    y = digits.target[order]
    return Data(x[:1437], x[1437:], y[:1437], y[1437:])


def _tfds(arg, data_dir, download=False):
    import tensorflow_datasets as tfds

    name, _, splits = arg.partition(":")
    train_split, _, test_split = splits.partition(":")
    train_split, test_split = train_split or "train", test_split or "test"
    try:
        parts = tfds.load(
            name, split=[train_split, test_split], data_dir=data_dir, download=download
        )
    except tfds.core.registered.DatasetNotFoundError as error:
        # TFDS's own message lists every registered data set, hundreds of lines.
        raise ValueError(
            f"unknown TFDS data set {name!r} (tfds.list_builders() names the known ones)"
        ) from error
    except Exception as error:
        if not download and isinstance(error, AssertionError):
            builder = tfds.builder(name, data_dir=data_dir)
            if not builder.is_prepared():
                root = builder.data_dir_root
                raise ValueError(
                    f"TFDS data set {name!r} is not prepared in {root} and downloading is off; "
                    f"prepare it with `tfds build {name} --data_dir {root}` or allow downloading"
                ) from error
        raise RuntimeError(
            f"Could not load TFDS data set {name!r} (splits {train_split!r}, {test_split!r}, "
            f"data_dir={data_dir!r}): {files.one_line(error)}. Without internet access the data must already "
            f"be prepared in data_dir (see `tfds build`)."
        ) from error
    if "image" not in parts[0].element_spec:
        raise ValueError(
            f"TFDS data set {name!r} has no 'image' feature: {list(parts[0].element_spec)}"
        )
    (x_train, y_train), (x_test, y_test) = (_tfds_arrays(part) for part in parts)
    return Data(x_train, x_test, y_train, y_test)


def _tfds_arrays(split):
    """(images in [0, 1], labels or None) of a TFDS split, read in batches."""
    images, labels = [], []
    for batch in split.batch(4096).as_numpy_iterator():
        images.append(batch["image"])
        labels.append(batch.get("label"))
    y = np.concatenate(labels) if labels[0] is not None else None
    return to_unit_interval(np.concatenate(images)), y


KERAS_LAYOUT = ("x_train", "x_test", "y_train", "y_test")  # what an npz data file holds
NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)  # damaged npz files


class _UnreadableNpz(ValueError):
    """Why an npz archive cannot be read, without its path (callers say what the file is)."""


def _read_npz(path, names):
    """{name: array} for those of ``names`` the npz archive at ``path`` holds, and all the
    names it holds; _UnreadableNpz saying why (naming the array) if it cannot be read."""
    if not zipfile.is_zipfile(path):
        raise _UnreadableNpz(
            "not an npz archive (np.savez writes a zip of .npy arrays; this file is not a zip, "
            "or is a truncated one)"
        )
    arrays, name = {}, None
    try:
        # Object arrays stay refused: unpickling a data file could run arbitrary code.
        with np.load(path, allow_pickle=False) as npz:
            held = npz.files
            for name in (n for n in names if n in held):
                arrays[name] = npz[name]
    except NPZ_ERRORS as error:
        where = "" if name is None else f"{name}: "
        raise _UnreadableNpz(f"{where}{files.one_line(error)}") from error
    for name, array in arrays.items():
        # NumPy hands back a member that is not a .npy array as raw bytes.
        if not isinstance(array, np.ndarray):
            raise _UnreadableNpz(f"{name}: not a .npy array")
    return arrays, held


def _npz(path):
    if not path.is_file():
        raise FileNotFoundError(f"npz data file not found: {path}")
    try:
        arrays, names = _read_npz(path, KERAS_LAYOUT)
    except _UnreadableNpz as error:
        raise ValueError(f"cannot read npz data file {path}: {error}") from error
    missing = {"x_train", "x_test"} - set(arrays)
    if missing:
        raise ValueError(
            f"npz data file {path} lacks {sorted(missing)} (it has {names}); "
            f"expected the Keras layout x_train, x_test, optional y_train, y_test."
        )
    for name, array in arrays.items():
        _check_numeric(array, f"npz data file {path}: {name}")
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    # The examples' shape itself is the model's to check (model.check_data names both).
    for split, x in (("train", x_train), ("test", x_test)):
        if x.ndim < 2:
            raise ValueError(
                f"npz data file {path}: x_{split} has shape {x.shape}; expected one example "
                f"per row, [N, ...]"
            )
        y = arrays.get(f"y_{split}")
        if y is not None and not labels_fit(y, len(x)):
            raise ValueError(
                f"npz data file {path}: y_{split} has shape {y.shape}; expected one label "
                f"per example of x_{split}, shape ({len(x)},) or ({len(x)}, C)"
            )
    return Data(
        to_unit_interval(x_train),
        to_unit_interval(x_test),
        arrays.get("y_train"),
        arrays.get("y_test"),
    )


def labels_fit(y, n):
    """Whether y holds one label per example of n: classes [n] or vectors [n, C]."""
    return y.ndim in (1, 2) and len(y) == n


def _check_numeric(array, what):
    """ValueError naming ``what`` unless the array holds real numbers (bool, int or float)."""
    if np.iscomplexobj(array):
        raise ValueError(
            f"{what} is complex ({array.dtype}); expected real pixel values (casting would "
            f"drop the imaginary part)"
        )
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{what} has dtype {array.dtype}; expected numbers (int or float)")


def _images(folder):
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = [_image_intensities(p) for p in files]
    shapes = {}
    for path, image in zip(files, images):
        shapes.setdefault(image.shape, path)
    if len(shapes) != 1:
        examples = ", ".join(f"{shape} ({path.name})" for shape, path in sorted(shapes.items()))
        raise ValueError(f"images in {folder} differ in shape: {examples}")
    classes = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    y = np.array([classes.index(p.parent.relative_to(folder).as_posix()) for p in files])
    x = np.stack(images)
    order = np.random.default_rng(0).permutation(len(files))
    n_test = max(1, len(files) // 10)
    test, train = order[:n_test], order[n_test:]
    return Data(x[train], x[test], y[train], y[test])


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's unsigned 16-bit gray modes


def _image_intensities(path):
    """The image file's pixels as float32 [H, W, C] in [0, 1]: 8-bit values / 255, 16-bit
    values / 65535; ValueError naming the file if it cannot be fully decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL only warns about images between its pixel limit and twice that.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decodes every pixel, so truncated files fail here
                mode = image.mode
                pixels = np.asarray(_gray_or_rgb(image))
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as error:
        raise ValueError(f"cannot read image {path}: {files.one_line(error)}") from error
    if mode == "F":
        raise ValueError(
            f"image {path} has floating-point pixels (mode F); expected 8- or 16-bit images"
        )
    if mode == "I" or mode in SIXTEEN_BIT_MODES:
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"image {path} has 32-bit pixel values {low}..{high}, outside the 16-bit "
                f"range 0..65535"
            )
        scaled = pixels.astype("float64") / 65535.0
    else:
        scaled = pixels / 255.0
    scaled = scaled.astype("float32")
    return scaled[..., None] if scaled.ndim == 2 else scaled


def _gray_or_rgb(image):
    """8-bit gray or RGB intensities of a PIL image (16- and 32-bit gray kept as they are):
    palette, binary and alpha images become intensities, not palette indices."""
    if image.mode in ("L", "RGB", "I", "F") or image.mode in SIXTEEN_BIT_MODES:
        return image
    return image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")


def binarize_once(x, seed=TEST_BINARIZATION_SEED):
    """x_bin ~ Bernoulli(x), drawn once with a fixed seed (the evaluation copy)."""
    return (np.random.default_rng(seed).uniform(size=x.shape) < x).astype("float32")


def fingerprint(x):
    """SHA-256 of x's float32 bytes: equal fingerprints mean the same test set, bit for bit."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype="float32").tobytes()).hexdigest()


def save_test_set(path, x, y=None):
    """Writes the evaluation copy x (and labels y) that a run is scored on, so later
    evaluations use the very same binarization; written atomically."""
    arrays = {"x": np.asarray(x, "float32")} | ({} if y is None else {"y": np.asarray(y)})
    with files.atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def load_test_set(path):
    """(x, y or None) from ``save_test_set``; FileNotFoundError or ValueError naming the
    file if it is missing or damaged."""
    path = Path(path)
    advice = "score another data set with --data"
    if not path.is_file():
        raise FileNotFoundError(f"the run's test set {path} is missing; {advice}")
    try:
        arrays, names = _read_npz(path, ("x", "y"))
    except _UnreadableNpz as error:
        raise ValueError(f"the run's test set {path} is damaged: {error}; {advice}") from error
    x, y = arrays.get("x"), arrays.get("y")
    if x is None:
        problem = f"it lacks the x array, it has {names}"
    elif x.dtype != np.float32 or x.ndim < 2 or len(x) == 0:
        problem = f"x is {x.dtype} of shape {x.shape}, not float32 [N, ...] with N > 0"
    elif y is not None and not labels_fit(y, len(x)):
        problem = f"y has shape {y.shape}, not one label per example ({len(x)},) or ({len(x)}, C)"
    else:
        return x, y
    raise ValueError(f"the run's test set {path} is damaged: {problem}; {advice}")


def steps_per_epoch(num_examples, batch_size):
    return math.ceil(num_examples / batch_size)


def training_dataset(x, batch_size, seed, binarize, initial_epoch, epochs, y=None):
    """Batches for epochs ``initial_epoch..epochs-1`` as one stream (of (x, y) pairs when
    labels y are given).

    Epoch e is shuffled (and, with ``binarize``, binarized afresh: x_bin ~ Bernoulli(x)) by
    stateless ops seeded with (seed, e), so a run resumed at epoch e sees exactly the batches
    the uninterrupted run would have seen.
    """
    x = tf.constant(x)
    y = None if y is None else tf.constant(y)
    n = int(x.shape[0])
    steps = steps_per_epoch(n, batch_size)

    def batch(step, idx, epoch):
        x_batch = _gather(x, idx, binarize, seed, epoch * steps + step)
        return x_batch if y is None else (x_batch, tf.gather(y, idx))

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.stack([tf.cast(seed, tf.int64), epoch])
        )
        # One slice of the permutation per batch, not one element per index batched again:
        # the pipeline's threads share the cores with the training step.
        return tf.data.Dataset.range(steps).map(
            lambda step: batch(step, order[step * batch_size : (step + 1) * batch_size], epoch),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    epochs_ds = tf.data.Dataset.range(initial_epoch, epochs)
    return _with_options(epochs_ds.flat_map(epoch_batches).prefetch(tf.data.AUTOTUNE))


def _with_options(dataset):
    """The pipeline's options: multi-worker runs split each global batch between workers
    (the data is in memory, there are no files to shard), and tf.data's autotuning is off."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # Gathering and binarizing in-memory batches needs no tuning, and on 2 cores the
    # autotuner can leave a run at half speed for its whole life (docs/benchmarks.md).
    options.autotune.enabled = False
    return dataset.with_options(options)


def _gather(x, idx, binarize, seed, step):
    batch = tf.gather(x, idx)
    if binarize:
        noise = tf.random.stateless_uniform(
            tf.shape(batch), seed=tf.stack([tf.cast(seed, tf.int64) + 1, step])
        )
        batch = tf.cast(noise < batch, batch.dtype)
    return batch


def evaluation_dataset(x, batch_size, y=None):
    """Batches of x (of (x, y) pairs when labels y are given), in order."""
    slices = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    return _with_options(slices.batch(batch_size).cache().prefetch(tf.data.AUTOTUNE))
