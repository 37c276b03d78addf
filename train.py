"""Train a VAE: ``python train.py [flags]`` is ``keras-vae train [flags]``.

With no flags it trains on the built-in 8×8 digits, writes a run directory under ``runs/``
(config, history, checkpoints, TensorBoard logs, plots, metrics) and exports a SavedModel
to ``saved_models/vae/<version>/``.
"""

import sys

from keras_vae.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
