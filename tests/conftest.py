import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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
