"""The VampPrior (Tomczak & Welling, 2018): p(z) = (1/K) Σ_k q_φ(z | u_k), the uniform
mixture of the model's own posterior at K learned pseudo-inputs u_k."""

import keras
from keras import ops

from keras_vae.priors import DiagonalGaussianMixture, MixturePrior


@keras.saving.register_keras_serializable(package="keras_vae")
class VampPrior(MixturePrior):
    """p(z) = (1/K) Σ_k q_φ(z | u_k), k = 1..K, with pseudo-inputs u_k of x's shape,
    learned with the model (initialised N(0.05, 0.01²), as in the paper's MNIST runs).

    Its gradient reaches the encoder as well as u: the prior and the posterior share φ.
    Each evaluation of p runs the encoder on the K pseudo-inputs.
    """

    reads_posterior = True
    posterior_requirement = "one that is a function of its parameters alone"

    @staticmethod
    def can_read(posterior):
        # Its density at z for K other examples' parameters would invert K flows per z.
        return posterior.params_complete

    def build(self, latent_shape, data_shape, condition_dim=0):
        self.pseudo_inputs = self.add_weight(
            shape=(self.num_components, *data_shape),
            initializer=keras.initializers.RandomNormal(mean=0.05, stddev=0.01, seed=self.seed),
            name="pseudo_inputs",
            dtype="float32",
        )

    def distribution(self, posterior_at, c=None):
        """(1/K) Σ_k q_φ(z | u_k), its components ``posterior_at`` the pseudo-inputs."""
        components = posterior_at(ops.convert_to_tensor(self.pseudo_inputs))
        return DiagonalGaussianMixture(
            ops.zeros((self.num_components,), "float32"), components.mean(), components.stddev()
        )
