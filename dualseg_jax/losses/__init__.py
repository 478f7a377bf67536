"""Every training loss as a pure function in a name -> function registry, and their weighted sum.

Each loss is `fn(views, batch, loss_config, step) -> (float32 scalar, metrics)`; `total_loss`
sums the ones with a non-zero weight in `config.loss.weights` (docs/adding-a-loss.md).
"""

from dualseg_jax.losses.registry import LOSSES, register, total_loss

# Imported for their @register side effect: each module adds its losses to LOSSES.
from dualseg_jax.losses import consistency  # noqa: E402,F401
from dualseg_jax.losses import contrastive  # noqa: E402,F401
from dualseg_jax.losses import sdf  # noqa: E402,F401
from dualseg_jax.losses import segmentation  # noqa: E402,F401

__all__ = ['LOSSES', 'register', 'total_loss']
