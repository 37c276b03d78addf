"""Adam with TensorFlow's fused update kernel."""

import keras
import tensorflow as tf
from keras import ops

from keras_vae.compat import adam_slots


@keras.saving.register_keras_serializable(package="keras_vae")
class FusedAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` whose per-variable update is TensorFlow's fused
    ``ResourceApplyAdam`` kernel: one op per variable instead of about ten.

    Same update as Keras's Adam, at step t with gradient g and learning rate η:
    m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²,  θ ← θ − α m / (√v + ε),
    α = η √(1 − β₂ᵗ) / (1 − β₁ᵗ); with ``amsgrad``, v̂ ← max(v̂, v) divides instead of v
    (``ResourceApplyAdamWithAmsgrad``). On a 2-core CPU the step of a small VAE is bound by
    how many ops TensorFlow dispatches, not by FLOPs, so fewer ops is faster
    (benchmarks/train_throughput.py). Sparse gradients use Keras's update.
    """

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        m, v, v_hat = adam_slots(self, variable)
        apply, extra = tf.raw_ops.ResourceApplyAdam, {}
        if self.amsgrad:
            apply = tf.raw_ops.ResourceApplyAdamWithAmsgrad
            extra = {"vhat": v_hat.handle}
        apply(
            **extra,
            var=variable.handle,
            m=m.handle,
            v=v.handle,
            beta1_power=ops.power(beta_1, step),
            beta2_power=ops.power(beta_2, step),
            lr=ops.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=ops.cast(self.epsilon, dtype),
            grad=ops.cast(gradient, dtype),
        )
