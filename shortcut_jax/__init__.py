"""shortcut_jax: shortcut models and few-step baselines in JAX/Flax."""
