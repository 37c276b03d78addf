"""Measures of the latent code z on examples x_1..x_N, in nats where they are information:

- KL per dimension: (1/N) Σ_n KL(q_φ(z_j|x_n) ‖ p(z_j)), j = 1..d, where q_φ(z|x) and p(z)
  factorize over the dimensions;
- unit activity A_j = Var_n(E_q[z_j|x_n]) and the active units, the j with A_j > 0.01
  (Burda et al., 2015);
- the mutual information I(x; z) = E_x E_{q_φ(z|x)}[log q_φ(z|x) − log q(z)] under the
  aggregate posterior q(z) = (1/N) Σ_n q_φ(z|x_n);
- a linear probe: the test accuracy of a logistic regression from E_q[z|x] to the labels.
"""

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy.special import logsumexp

tfd = tfp.distributions

ACTIVE_UNIT_THRESHOLD = 0.01
# N of the mutual information: a random subset of the examples, its cost O(N² d).
MI_EXAMPLES = 2000
# The most training examples the linear probe is fitted to (a random subset).
PROBE_EXAMPLES = 10_000
# The most log q_φ(z_m|x_n) terms × d held at once by the mutual information.
MI_BLOCK_ELEMENTS = 2**23


def encode_all(model, x, batch_size=100, y=None):
    """The parameters of q_φ(z|x_n) (q_φ(z|x_n, y_n) for a conditional model and labels y)
    for every example: {name: float32 array [N, …]}."""
    parts = [
        model.encode_params(x[i : i + batch_size], y=None if y is None else y[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    ]
    return {key: np.concatenate([np.asarray(part[key]) for part in parts]) for key in parts[0]}


def _tensors(params):
    """The parameter arrays as float32 tensors, by name."""
    return {key: tf.constant(value) for key, value in params.items()}


def kl_per_dimension(model, params, y=None):
    """(1/N) Σ_n KL(q_φ(z_j|x_n) ‖ p(z_j)) for j = 1..d ([d] array, nats) from the
    posterior parameters of N examples (and their labels y, for a prior p(z_j|y) that reads
    them); None unless q_φ(z|x) and p(z) both factorize."""
    posterior = model.posterior.marginals(_tensors(params))
    prior = model.prior.marginals(model.condition(y))  # c(y) is None for an unconditional model
    if posterior is None or prior is None:
        return None
    return np.float64(tf.reduce_mean(tfd.kl_divergence(posterior, prior), axis=0))


def unit_activity(z_mean):
    """A_j = Var_n(E_q[z_j|x_n]): the variance over the N examples of each coordinate of the
    posterior mean ([N, d] → [d])."""
    return np.var(np.float64(z_mean), axis=0)


def mutual_information(model, params, seed=0, num_examples=MI_EXAMPLES):
    """The estimate of I(x; z) under q(z) = (1/N) Σ_m q_φ(z|x_m), with one draw
    z_n ~ q_φ(z|x_n) per example:
        Î = (1/N) Σ_n [log q_φ(z_n|x_n) − log (1/N) Σ_m q_φ(z_n|x_m)] ≤ log N,
    on the N examples of ``params`` (the posterior parameters), or on a random subset of
    ``num_examples`` of them drawn with ``seed``. Returns {value, num_examples, upper_bound}
    (upper_bound = log N)."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1; got {num_examples}")
    total = len(next(iter(params.values())))
    if total > num_examples:
        keep = np.sort(np.random.default_rng(seed).choice(total, num_examples, replace=False))
        params = {key: value[keep] for key, value in params.items()}
    n = min(total, num_examples)
    params = _tensors(params)
    z = model.posterior.sample(params, 1, seed=seed)[0]
    posterior = model.posterior.distribution(params)
    rows = max(1, MI_BLOCK_ELEMENTS // (n * int(z.shape[-1])))
    terms = []
    for start in range(0, n, rows):
        # log q_φ(z_m|x_n) for the block's z_m against every x_n: [rows, N].
        block = np.float64(posterior.log_prob(z[start : start + rows, None, :]))
        own = block[np.arange(len(block)), np.arange(start, start + len(block))]
        terms.append(own - logsumexp(block, axis=1))
    return {
        "value": float(np.mean(np.concatenate(terms)) + math.log(n)),
        "num_examples": n,
        "upper_bound": math.log(n),
    }


def probe_accuracy(z_train, y_train, z_test, y_test):
    """The accuracy on (z_test, y_test) of a multinomial logistic regression (inputs
    standardized, L2 penalty C = 1) fitted to (z_train, y_train)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    # One thread: the problem is small, and BLAS/OpenMP threads contending with
    # TensorFlow's for the cores slow the fit down many times over.
    with threadpool_limits(1):
        probe.fit(z_train, y_train)
        return float(probe.score(z_test, y_test))


def check_probe_data(model, x, y=None, x_train=None, y_train=None):
    """ValueError naming the problem unless the linear probe's data are all absent, or all
    present and consistent: one label per example of x and of x_train, two classes or more
    in y_train, x_train the model's data (``model.check_data``)."""
    given = {"y": y is not None, "x_train": x_train is not None, "y_train": y_train is not None}
    if not any(given.values()):
        return
    if not all(given.values()):
        missing = ", ".join(name for name, present in given.items() if not present)
        raise ValueError(
            f"the linear probe needs y, x_train and y_train together; {missing} missing"
        )
    if not len(x_train):
        raise ValueError("x_train has no examples")
    for name, labels, examples in (("y", y, x), ("y_train", y_train, x_train)):
        if np.shape(labels) != (len(examples),):
            raise ValueError(
                f"{name} has shape {np.shape(labels)}: one label per example needs "
                f"({len(examples)},)"
            )
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise ValueError(f"the linear probe needs 2 or more classes in y_train; got {classes}")
    model.check_data(x_train)
    if model.conditional:  # its encoder reads the probe's labels too
        model.check_labels(y)
        model.check_labels(y_train)


def probe_data(model, y, x_train, y_train):
    """(y, x_train, y_train) for the linear probe, or three Nones where there is none to
    fit: labels that are vectors, or a conditional model's labels given alone (to condition
    it, not to ask for a probe)."""
    vectors = y is not None and np.ndim(y) != 1
    if vectors or (model.conditional and x_train is None and y_train is None):
        return None, None, None
    return y, x_train, y_train


def latent_report(model, x, batch_size=100, seed=0, y=None, x_train=None, y_train=None):
    """The measures of the latent code on x: ``kl_per_dimension`` (list, or None),
    ``activity``, ``active_units``, ``active_units_per_layer`` (z_1..z_L's counts for a model
    with ``latent_layers``, else None), ``active_unit_threshold``, ``mutual_information`` and
    ``probe_accuracy``: with the class labels y of x and a labelled training set (x_train,
    y_train, at most ``PROBE_EXAMPLES`` of it, a random subset drawn with ``seed``) the
    probe's accuracy on E_q[z|x], else None. A conditional model's posterior reads the
    labels: E_q[z|x, y], and the probe measures what z holds of y beyond them."""
    probe_y, x_train, y_train = probe_data(model, y, x_train, y_train)
    check_probe_data(model, x, probe_y, x_train, y_train)
    x = np.asarray(x, "float32")
    params = encode_all(model, x, batch_size, y if model.conditional else None)
    z_mean = np.asarray(model.posterior.mean(_tensors(params)))
    activity = unit_activity(z_mean)
    kl = kl_per_dimension(model, params, y)
    probe = None
    if x_train is not None:
        x_train = np.asarray(x_train, "float32")
        y_train = np.asarray(y_train)
        if len(x_train) > PROBE_EXAMPLES:
            keep = np.sort(
                np.random.default_rng(seed).choice(len(x_train), PROBE_EXAMPLES, replace=False)
            )
            x_train, y_train = x_train[keep], y_train[keep]
        train_params = encode_all(
            model, x_train, batch_size, y_train if model.conditional else None
        )
        z_train = np.asarray(model.posterior.mean(_tensors(train_params)))
        probe = probe_accuracy(z_train, y_train, z_mean, np.asarray(y))
    return {
        "kl_per_dimension": None if kl is None else kl.tolist(),
        "activity": activity.tolist(),
        "active_units": int(np.sum(activity > ACTIVE_UNIT_THRESHOLD)),
        "active_units_per_layer": [
            int(np.sum(layer > ACTIVE_UNIT_THRESHOLD))
            for layer in np.split(activity, np.cumsum(model.latent_layers)[:-1])
        ]
        if model.latent_layers
        else None,
        "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
        # Where q is not a function of its parameters alone (a flow, a hierarchy), its density
        # at other examples' z would need a pass per pair: not estimated.
        "mutual_information": (
            mutual_information(model, params, seed) if model.posterior.params_complete else None
        ),
        "probe_accuracy": probe,
    }
