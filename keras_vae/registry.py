"""The named pieces a model is built from, by kind: network families, likelihoods, priors
and posteriors.

Each entry names the object that makes the piece (``"module:attribute"``), imported only
when the piece is built, so that reading the names (for settings, flags and their checks)
imports no TensorFlow. A new piece is a new file plus one line here.
"""

import dataclasses
import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """``target``: ``"module:attribute"`` of the builder or class; ``autoregressive``: a
    network family whose decoder reads x_<d as well as z."""

    target: str
    autoregressive: bool = False


REGISTRY = {
    "network": {
        "mlp": Entry("keras_vae.networks.mlp:build"),
        "gated_mlp": Entry("keras_vae.networks.gated_mlp:build"),
        "conv": Entry("keras_vae.networks.conv:build"),
        "made": Entry("keras_vae.networks.made:build", autoregressive=True),
        "pixelcnn_made": Entry("keras_vae.networks.pixelcnn_made:build", autoregressive=True),
    },
    "likelihood": {
        "bernoulli": Entry("keras_vae.likelihoods:BernoulliLikelihood"),
        "continuous_bernoulli": Entry("keras_vae.likelihoods:ContinuousBernoulliLikelihood"),
        "gaussian": Entry("keras_vae.likelihoods:GaussianLikelihood"),
    },
    "prior": {
        "standard_normal": Entry("keras_vae.priors:StandardNormal"),
        "mixture": Entry("keras_vae.priors:GaussianMixture"),
        "vamp": Entry("keras_vae.vamp_prior:VampPrior"),
        "conditional_gaussian": Entry("keras_vae.conditional_prior:ConditionalGaussian"),
        "hierarchical": Entry("keras_vae.hierarchy:HierarchicalPrior"),
    },
    "posterior": {
        "diagonal_gaussian": Entry("keras_vae.posteriors:DiagonalGaussian"),
        "iaf": Entry("keras_vae.iaf:IAFPosterior"),
        "bottom_up": Entry("keras_vae.hierarchy:BottomUpPosterior"),
        "top_down": Entry("keras_vae.hierarchy:TopDownPosterior"),
        "ladder": Entry("keras_vae.hierarchy:LadderPosterior"),
    },
}


def names(kind):
    """The registered names of ``kind``, in registration order."""
    return tuple(REGISTRY[kind])


def entry(kind, name):
    """The registry entry of ``name``; a ValueError lists the known names."""
    if name not in REGISTRY[kind]:
        raise ValueError(f"Unknown {kind} {name!r}; expected one of {names(kind)}.")
    return REGISTRY[kind][name]


def load(kind, name):
    """The builder or class registered as ``name`` of ``kind``."""
    module, _, attribute = entry(kind, name).target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def make(kind, registered_name, settings=None, **kwargs):
    """The piece registered as ``registered_name`` of ``kind``, made with ``kwargs`` and with
    those fields of ``settings`` (a dataclass or dict) that its constructor names."""
    cls = load(kind, registered_name)
    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in (settings or {}).items() if k in accepted}, **kwargs)


def load_all():
    """Imports every registered piece, so that the Keras classes they define are known to
    ``keras.saving`` when a saved model is deserialized."""
    for kind, entries in REGISTRY.items():
        for name in entries:
            load(kind, name)


def name_of(kind, piece):
    """The registered name of ``piece``'s class; a ValueError if it is not registered."""
    for name in REGISTRY[kind]:
        if type(piece) is load(kind, name):
            return name
    raise ValueError(f"{type(piece).__name__} is not a registered {kind}")
