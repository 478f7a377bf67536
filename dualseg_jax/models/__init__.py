"""The dual-task network and RandConv, the device-side intensity augmentation that makes its views."""

from dualseg_jax.models.randconv import random_views, random_views_with_parameters, two_views
from dualseg_jax.models.unet import DualTaskUNet, build_model, init_variables

__all__ = ['DualTaskUNet', 'build_model', 'init_variables', 'random_views',
           'random_views_with_parameters', 'two_views']
