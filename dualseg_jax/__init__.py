"""dualseg-jax: dual-task pancreas and pancreatic-tumour segmentation in 3D CT, in JAX."""
