"""The layers that draw random numbers: the reparameterized sampling z = μ + σ ⊙ ε,
ε ~ N(0, I), and dropout; both save their seed state with the model."""

import keras
import tensorflow as tf
from keras import ops


class SavesSeedState:
    """Saves the layer's ``seed_generator`` state with its weights. Keras saves a layer's
    weights but not its SeedGenerator's state; without it a restored model would redraw the
    random numbers it already used, and a resumed run would differ from the uninterrupted
    one."""

    def save_own_variables(self, store):
        store["seed_generator_state"] = self.seed_generator.state.numpy()

    def load_own_variables(self, store):
        self.seed_generator.state.assign(store["seed_generator_state"])


@keras.saving.register_keras_serializable(package="keras_vae")
class Dropout(SavesSeedState, keras.layers.Dropout):
    """``keras.layers.Dropout`` (rate > 0) whose seed state is saved with the model and
    whose masks are independent across the replicas of a ``tf.distribute`` strategy."""

    def call(self, inputs, training=False):
        context = tf.distribute.get_replica_context()
        if (
            not training
            or self.rate in (0, 1)  # rate 0 or 1: no mask
            or context is None
            or context.num_replicas_in_sync == 1
        ):
            return super().call(inputs, training=training)
        # Every replica holds the same seed state, so Keras's dropout would drop the same
        # units on each replica's share of the batch; the replica's index, folded into the
        # seed, makes the masks independent. (Unlike Sampling's ε, the masks are not sliced
        # from one global draw: a decoder's rows are K samples × batch, flattened.)
        seed = tf.random.experimental.stateless_fold_in(
            self.seed_generator.next(), context.replica_id_in_sync_group
        )
        noise_shape = (
            None
            if self.noise_shape is None
            else [tf.shape(inputs)[i] if n is None else n for i, n in enumerate(self.noise_shape)]
        )
        return tf.nn.experimental.stateless_dropout(
            inputs, self.rate, seed, noise_shape=noise_shape
        )


@keras.saving.register_keras_serializable(package="keras_vae")
class Sampling(SavesSeedState, keras.layers.Layer):
    """Draws z = μ + exp(½ log σ²) ⊙ ε with ε ~ N(0, I).

    Called on ``(z_mean, z_log_var)`` of shape ``[batch, d]``. With ``num_samples=None``
    it returns one draw per input, shape ``[batch, d]``; with ``num_samples=K`` it
    returns ``[K, batch, d]`` (K draws per input, for importance sampling).

    The noise comes from the layer's own ``SeedGenerator`` (so a seeded layer gives a
    reproducible stream), from ``seed`` when one is passed to ``call``, or is given as
    ``epsilon`` (broadcast against μ; used by served functions, which need stateless noise).
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, num_samples=None, seed=None, epsilon=None):
        z_mean, z_log_var = inputs
        if epsilon is None:
            shape = ops.shape(z_mean)
            if num_samples is not None:
                shape = (num_samples,) + tuple(shape)
            epsilon = self._noise(shape, z_mean.dtype, seed)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon

    def _noise(self, shape, dtype, seed):
        seed = self.seed_generator if seed is None else seed
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return keras.random.normal(shape, dtype=dtype, seed=seed)
        # Under tf.distribute each replica draws the noise of the whole global batch and
        # keeps its own rows: training then matches one device for the same seed, also when
        # the replicas' shares of the batch differ.
        axis = len(shape) - 2
        rows = tf.convert_to_tensor(shape[axis])
        sizes = context.all_gather(tf.reshape(rows, [1]), axis=0)
        global_shape = list(shape)
        global_shape[axis] = tf.reduce_sum(sizes)
        noise = keras.random.normal(global_shape, dtype=dtype, seed=seed)
        start = [0] * len(shape)
        start[axis] = tf.reduce_sum(sizes[: context.replica_id_in_sync_group])
        return tf.slice(noise, start, shape)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_vae")
class SeedStream(SavesSeedState, keras.layers.Layer):
    """A stream of stateless seeds (int32, shape [2]) from a ``SeedGenerator`` whose state is
    saved with the model: TFP's ``sample(seed=...)`` takes them, and a seeded stream gives
    the same draws after a save and reload."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def next(self):
        return tf.cast(self.seed_generator.next(), tf.int32)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
