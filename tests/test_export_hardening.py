"""Export hardening: model names that stay inside the export folder, temporary folders of
killed exports cleaned up, and the ``score`` signature computed in bounded row chunks."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from helpers import make_vae
from tensorflow_serving.config import model_server_config_pb2

from keras_vae import export
from keras_vae.export import (
    SCORE_CHUNK,
    SCORE_SAMPLES,
    check_model_name,
    export_model,
    score_epsilon,
    serving_functions,
)

BAD_NAMES = [
    "../x",
    "../../x",
    "/abs",
    "",
    ".",
    "..",
    "a/b",
    "a\\b",
    'a"b',
    "a'b",
    "a\nb",
    "vae\n",
    "a b",
    "a\x00b",
    "a:b",
    "modèle",
    None,
    b"vae",
    Path("vae"),
]
GOOD_NAMES = ["vae", "my-model_2.1", "V2"]


@pytest.fixture(scope="module")
def model():
    return make_vae((8, 8, 1), latent_dim=3, hidden_units=(16,), seed=0)


def expected_message(name):
    return (
        f"model name {name!r} must be a plain name: letters, digits, '.', '_', '-' "
        f"(not '.' or '..')"
    )


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_model_names_are_refused_and_nothing_is_written(model, tmp_path, name):
    with pytest.raises(ValueError) as refused:
        check_model_name(name)
    assert str(refused.value) == expected_message(name)
    with pytest.raises(ValueError) as refused:
        export_model(model, tmp_path / "saved_models", name)
    assert str(refused.value) == expected_message(name)
    assert "\n" not in str(refused.value)
    assert list(tmp_path.rglob("*")) == []
    # Nothing escaped upwards either: the names that climb out would land beside tmp_path.
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_plain_model_names_export(model, tmp_path, name):
    assert check_model_name(name) == name
    version = export_model(model, tmp_path, name)
    assert version == tmp_path / name / "1"
    assert (version / "saved_model.pb").is_file()
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["1", "models.config"]
    config = text_format.Parse(
        (tmp_path / name / "models.config").read_text(),
        model_server_config_pb2.ModelServerConfig(),
    )
    (entry,) = config.model_config_list.config
    assert (entry.name, entry.base_path) == (name, f"/models/{name}")


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_are_removed_others_kept(model, tmp_path):
    model_dir = tmp_path / "vae"
    dead = dead_pid()
    live = os.getpid()
    parent = os.getppid()
    folders = {
        f".export-{dead}-x": False,  # a killed export's folder
        f".export-{dead}-abc_12": False,
        f".export-{live}-x": True,  # this (running) process's own
        f".export-{parent}-y": True,  # another running process's
        ".export-0-x": True,  # 0 is no process's pid
        ".export-x1y2z3": True,  # not named by a pid: not ours to judge
        f".export-{dead}": True,  # no random part: not one of ours
        f"other-{dead}-x": True,
    }
    for folder in folders:
        (model_dir / folder / "model").mkdir(parents=True)
        (model_dir / folder / "model" / "weights").write_bytes(b"written before")
    (model_dir / f".export-{dead}-file").write_bytes(b"a file, not a folder")
    version = export_model(model, tmp_path, "vae")
    for folder, kept in folders.items():
        assert (model_dir / folder).exists() == kept, folder
        if kept:
            assert (model_dir / folder / "model" / "weights").read_bytes() == b"written before"
    assert (model_dir / f".export-{dead}-file").read_bytes() == b"a file, not a folder"
    assert version == model_dir / "1" and (version / "saved_model.pb").is_file()
    # The export's own temporary folder is gone once it is done.
    left = {p.name for p in model_dir.iterdir()}
    assert left == {n for n, kept in folders.items() if kept} | {
        f".export-{dead}-file",
        "1",
        "models.config",
    }


def test_the_temporary_folder_is_named_by_the_writing_process(model, tmp_path, monkeypatch):
    seen = []
    original = export.write_warmup_requests

    def spy(path, *args):
        # path is <tmp folder>/model/assets.extra/<file>, written before the rename.
        seen.append(Path(path).parents[2].name)
        return original(path, *args)

    monkeypatch.setattr(export, "write_warmup_requests", spy)
    export_model(model, tmp_path, "vae")
    (name,) = seen
    assert re.fullmatch(rf"\.export-{os.getpid()}-\w+", name), name
    assert not (tmp_path / "vae" / name).exists()


def test_a_killed_export_is_cleaned_up_by_the_next(model, tmp_path):
    """A process killed mid-export leaves its folder; the next export removes it."""
    script = (
        "import os, signal, sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from helpers import make_vae\n"
        "from keras_vae import export\n"
        "def killed(*args):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "export.write_warmup_requests = killed\n"
        "model = make_vae((8, 8, 1), latent_dim=3, hidden_units=(16,), seed=0)\n"
        "export.export_model(model, sys.argv[1], 'vae')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert child.returncode == -9, child.stderr[-2000:]
    (stale,) = (tmp_path / "vae").glob(".export-*")
    assert (stale / "model" / "saved_model.pb").is_file()
    export_model(model, tmp_path, "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["1", "models.config"]


def some_rows(rows, seed=0):
    return np.random.default_rng(seed).uniform(size=(rows,) + (8, 8, 1)).astype("float32")


@pytest.mark.parametrize("rows", [150, 1, 0])
def test_served_score_matches_the_model_row_by_row(model, tmp_path, rows):
    """150 rows: two whole chunks of SCORE_CHUNK and a part; 0 rows still answers."""
    assert rows == 0 or rows % SCORE_CHUNK != 0
    x = some_rows(rows)
    served = tf.saved_model.load(str(export_model(model, tmp_path, "vae"))).signatures["score"]
    got = served(x=tf.constant(x))
    want = model.score(x, SCORE_SAMPLES, epsilon=score_epsilon(model.latent_dim))
    assert set(got) == {"elbo", "log_px"}
    for key in ("elbo", "log_px"):
        assert got[key].shape == (rows,) and got[key].dtype == tf.float32
        for i in range(rows):
            # Equal up to float32 round-off: the same operations on the same values.
            assert np.isclose(got[key][i], want[key][i], rtol=1e-6, atol=0), (key, i)


@pytest.mark.parametrize(
    "rows, chunks", [(150, [64, 64, 22]), (64, [64]), (65, [64, 1]), (3, [3]), (0, [0])]
)
def test_score_never_passes_more_than_a_chunk_of_rows(rows, chunks, monkeypatch):
    model = make_vae((8, 8, 1), latent_dim=3, hidden_units=(16,), seed=0)
    assert SCORE_CHUNK == 64
    seen = []
    original = model.score

    def spy(x, *args, **kwargs):
        seen.append(int(tf.shape(x)[0]))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model, "score", spy)
    score = serving_functions(model)["score"]
    # Eagerly, the while loop runs as a Python loop, so the spy sees every chunk.
    tf.config.run_functions_eagerly(True)
    try:
        got = score(tf.constant(some_rows(rows, seed=1)))
    finally:
        tf.config.run_functions_eagerly(False)
    assert seen == chunks
    assert got["log_px"].shape == (rows,)


def test_an_autoregressive_decoders_score_is_chunked_too(tmp_path):
    model = make_vae(
        (4, 4, 1), latent_dim=2, architecture="made", hidden_units=(8,), likelihood="bernoulli"
    )
    x = (np.random.default_rng(2).uniform(size=(SCORE_CHUNK + 5, 4, 4, 1)) < 0.5).astype("float32")
    served = tf.saved_model.load(str(export_model(model, tmp_path, "made"))).signatures["score"]
    got = served(x=tf.constant(x))
    want = model.score(x, SCORE_SAMPLES, epsilon=score_epsilon(model.latent_dim))
    for key in ("elbo", "log_px"):
        for i in range(len(x)):
            assert np.isclose(got[key][i], want[key][i], rtol=1e-6, atol=0), (key, i)
