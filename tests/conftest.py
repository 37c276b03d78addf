import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# pytest-xdist workers share the cores: each TensorFlow gets its share, not all of them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8×8 digits in [0, 1], shape [1797, 8, 8, 1]."""
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0).astype("float32")[..., None]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
