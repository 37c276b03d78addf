"""The model's settings, each defined, checked and documented once (see ``settings``).

- ``VAEConfig``: the objective's hyperparameters, which ``VAE`` holds and serializes.
- ``NetworkConfig``: the settings of the named network families (``networks.build``).
- ``DistributionsConfig``: which likelihood, prior and posterior, by registered name.

No TensorFlow is imported here: the run config and the CLI read these classes for their
flags and checks.
"""

from dataclasses import dataclass

from keras_vae import registry
from keras_vae.settings import (
    finite_nonnegative,
    finite_positive,
    positive,
    setting,
    unit_interval_open_right,
)


@dataclass(frozen=True)
class VAEConfig:
    """The hyperparameters of ``VAE``'s objective.

    Per example: reconstruction_loss = −E_q[log p_θ(x|z)], kl_loss = KL(q_φ(z|x) ‖ p(z)),
    elbo = −reconstruction_loss − kl_loss, and loss = reconstruction_loss + β kl_loss
    (objective "elbo") or −log (1/K) Σ_k p_θ(x|z_k) p(z_k)^β / q_φ(z_k|x)^β ("iwae").
    """

    latent_dim: int = setting(8, "d, the size of z", check=positive, requirement="be >= 1")
    beta: float = setting(
        1.0,
        "β, the weight of the KL term (and of log p(z) − log q(z|x) in the IWAE bound)",
        check=finite_nonnegative,
        requirement="be finite and >= 0",
    )
    kl_warmup_steps: int = setting(
        0,
        "β rises linearly from β/steps to β over this many optimizer steps (KL annealing); 0: off",
        check=lambda v: v >= 0,
        requirement="be >= 0",
    )
    kl: str = setting(
        "auto",
        "the KL estimator: 'analytic' (the closed form, e.g. ½Σ(σ² + μ² − 1 − log σ²) for "
        "the diagonal Gaussian and N(0, I)), 'mc' (Monte Carlo: the mean of log q(z|x) − "
        "log p(z) over the model's samples) or 'auto' (the closed form where the prior and "
        "posterior have one, else Monte Carlo)",
        choices=("auto", "analytic", "mc"),
    )
    free_bits: float = setting(
        0.0,
        "λ, free bits (nats): the training loss's KL term is Σ_j max(λ, batch mean of "
        "KL_j), per latent dimension j where q and p factorize, per stochastic layer l of "
        "a top-down hierarchy max(λ·d_l, KL_l), else max(λ·d, KL); the reported kl_loss "
        "and elbo stay the true ones; 0: off (objective 'elbo' only)",
        check=finite_nonnegative,
        requirement="be finite and >= 0",
    )
    objective: str = setting(
        "elbo",
        "the training bound: 'elbo', or 'iwae' (the "
        "importance-weighted bound with num_samples samples)",
        choices=("elbo", "iwae"),
    )
    num_samples: int = setting(
        1,
        "K, the samples of z per example in the training objective",
        check=positive,
        requirement="be >= 1",
    )
    gradient_estimator: str = setting(
        "reparam",
        "the encoder's gradient of the IWAE bound: 'reparam' (through z = μ + "
        "σ ⊙ ε and q's parameters) or 'dreg' (doubly reparameterized, Tucker et al. 2019: "
        "same expectation, typically less variance; objective 'iwae' only)",
        choices=("reparam", "dreg"),
    )
    num_classes: int = setting(
        0,
        "a conditional model on integer labels y ∈ [0, num_classes): q(z|x, y) and "
        "p(x|z, y) read y's one-hot; 0: not conditional on classes",
        check=lambda v: v >= 0,
        requirement="be >= 0",
    )
    condition_dim: int = setting(
        0,
        "a conditional model on real label vectors y of this size (a one-hot is one): "
        "q(z|x, y) and p(x|z, y) read y; 0: not conditional on vectors",
        check=lambda v: v >= 0,
        requirement="be >= 0",
    )
    seed: int | None = setting(
        0,
        "seed of the sampling noise, dropout and data order",
        check=lambda v: v is None or 0 <= v < 2**32,
        requirement="be None or an integer in [0, 2**32)",
    )
    check_inputs: bool = setting(
        True,
        "assert that every batch is finite and in the likelihood's support (XLA drops "
        "assertions: then compile leaves XLA off unless asked, and check the data first)",
    )

    def rules(self):
        return [
            (
                "gradient_estimator",
                self.gradient_estimator != "dreg" or self.objective == "iwae",
                "'dreg' estimates the IWAE bound's gradient: it needs objective 'iwae'",
            ),
            (
                "free_bits",
                self.free_bits == 0 or self.objective == "elbo",
                "floors the ELBO's KL term: it needs objective 'elbo'",
            ),
            (
                "condition_dim",
                self.num_classes == 0 or self.condition_dim == 0,
                "and num_classes cannot both be set: labels are classes or vectors",
            ),
        ]


@dataclass(frozen=True)
class NetworkConfig:
    """The settings of the named network families (``keras_vae.networks.build``)."""

    architecture: str = setting(
        "mlp",
        "encoder/decoder family: mlp, gated_mlp (gated layers, a(Wx + b) ⊙ sigmoid(Vx + c)), "
        "conv (strided 3×3 convolutions), made (an "
        "autoregressive MADE decoder, binary data), pixelcnn_made (MADE + masked "
        "convolutions, single-channel images)",
        choices=lambda: registry.names("network"),
    )
    hidden_units: tuple[int, ...] = setting(
        (256, 128),
        "widths of the MLP layers (encoder order; the decoder mirrors them); "
        "conv: the encoder's Dense layers after the convolutions",
        check=lambda v: all(n >= 1 for n in v),
        requirement="have widths >= 1",
    )
    filters: tuple[int, ...] = setting(
        (32, 64),
        "conv: channels of the stride-2 convolutions; pixelcnn_made: the equal "
        "widths of its masked convolutions",
        check=lambda v: len(v) >= 1 and min(v) >= 1,
        requirement="have at least one width, each >= 1",
    )
    pixel_head_units: int = setting(
        0,
        "pixelcnn_made: width of a per-pixel layer that mixes the masked convolutions' "
        "features with a learned map of z (0: none; they enter the logits linearly)",
        check=lambda v: v >= 0,
        requirement="be >= 0",
    )
    pixel_head_layers: int = setting(
        0,
        "pixelcnn_made: masked 3×3 residual convolutions of the pixel head's units, run for "
        "each sample of z (needs pixel_head_units)",
        check=lambda v: v >= 0,
        requirement="be >= 0",
    )
    activation: str = setting("relu", "nonlinearity of the hidden layers (a Keras activation name)")
    dropout: float = setting(
        0.0,
        "rate of dropout on the decoder's hidden units while training",
        check=unit_interval_open_right,
        requirement="be in [0, 1)",
    )

    @property
    def autoregressive(self):
        """Whether the family's decoder reads x_<d as well as z."""
        return registry.entry("network", self.architecture).autoregressive

    def rules(self):
        return [
            (
                "hidden_units",
                not self.autoregressive or len(self.hidden_units) >= 1,
                f"needs at least one width for architecture {self.architecture!r}",
            ),
            (
                "filters",
                self.architecture != "pixelcnn_made" or len(set(self.filters)) == 1,
                "must be equal widths (residual layers) for architecture 'pixelcnn_made'",
            ),
            (
                "pixel_head_units",
                self.architecture == "pixelcnn_made" or self.pixel_head_units == 0,
                "applies only to architecture 'pixelcnn_made'",
            ),
            (
                "pixel_head_layers",
                self.pixel_head_layers == 0 or self.pixel_head_units > 0,
                "needs a pixel head (pixel_head_units > 0)",
            ),
        ]


@dataclass(frozen=True)
class DistributionsConfig:
    """The likelihood p_θ(x|z), prior p(z) and posterior q_φ(z|x), by registered name."""

    likelihood: str = setting(
        "bernoulli",
        "p_θ(x|z): bernoulli (binary data; logits), continuous_bernoulli ([0, 1] "
        "data), gaussian (N(μ_θ(z), σ²I))",
        choices=lambda: registry.names("likelihood"),
    )
    sigma: float = setting(
        1.0,
        "the Gaussian likelihood's σ (its starting value if learned)",
        check=finite_positive,
        requirement="be finite and > 0",
    )
    learn_sigma: str = setting(
        "none",
        "the Gaussian σ: fixed ('none'), one learned value "
        "('shared') or one per data element ('per_pixel')",
        choices=("none", "shared", "per_pixel"),
    )
    prior: str = setting(
        "standard_normal",
        "p(z): standard_normal (N(0, I)), mixture (a learned mixture of diagonal Gaussians), "
        "vamp (the VampPrior: the posterior's mixture at learned pseudo-inputs), "
        "conditional_gaussian (p(z|y): learned means and scales per label; conditional "
        "models), hierarchical (p(z_L) Π p(z_l|z_l+1) over the latent_layers, p(z_L) the "
        "top_prior)",
        choices=lambda: registry.names("prior"),
    )
    num_components: int = setting(
        10,
        "K, the components of the mixture and vamp priors (the VampPrior paper used 500)",
        check=positive,
        requirement="be >= 1",
    )
    posterior: str = setting(
        "diagonal_gaussian",
        "q_φ(z|x): diagonal_gaussian (N(μ_φ(x), diag σ²_φ(x))), iaf (that Gaussian followed "
        "by an inverse autoregressive flow); over the latent_layers: bottom_up (q(z_1|x) "
        "Π q(z_l|z_l−1)), top_down (q(z_L|x) Π q(z_l|z_l+1, x)) or ladder (top-down, each "
        "layer a bottom-up estimate merged with the hierarchical prior's p(z_l|z_l+1))",
        choices=lambda: registry.names("posterior"),
    )
    flow_steps: int = setting(
        2,
        "iaf: T, the flow's steps (T = 0: the diagonal Gaussian)",
        check=lambda v: v >= 0,
        requirement="be >= 0",
    )
    flow_hidden_units: tuple[int, ...] = setting(
        (320,),
        "iaf: widths of each step's autoregressive network (MADE) hidden layers",
        check=lambda v: len(v) >= 1 and min(v) >= 1,
        requirement="have at least one width, each >= 1",
    )
    latent_layers: tuple[int, ...] = setting(
        (),
        "hierarchical prior and posteriors: d_1, …, d_L, the sizes of the stochastic layers "
        "z_1 (next to x) to z_L, which sum to latent_dim; (): one layer of latent_dim",
        check=lambda v: all(n >= 1 for n in v),
        requirement="have sizes >= 1",
    )
    layer_hidden_units: tuple[int, ...] = setting(
        (100, 100),
        "hierarchical prior and posteriors: widths of the MLP of each conditional "
        "p(z_l|z_l+1), q(z_l|z_l−1) or q(z_l|z_l+1, x)",
        check=lambda v: all(n >= 1 for n in v),
        requirement="have widths >= 1",
    )
    layer_activation: str = setting(
        "tanh", "hierarchical prior and posteriors: the nonlinearity of those MLPs"
    )
    layer_gated: bool = setting(
        False,
        "hierarchical prior and posteriors: gate each hidden layer of those MLPs, "
        "a(Wx + b) ⊙ sigmoid(Vx + c), as the gated_mlp family does",
    )
    top_prior: str = setting(
        "standard_normal",
        "hierarchical prior: p(z_L), one of the other priors (vamp: the mixture of q(z_L|x) "
        "at the pseudo-inputs, with a top-down posterior)",
        choices=lambda: tuple(n for n in registry.names("prior") if n != "hierarchical"),
    )
