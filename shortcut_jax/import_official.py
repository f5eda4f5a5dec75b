"""Import a checkpoint of the reference (official) shortcut-models code into a project workdir.

The reference code saves a pickle holding ``{'train_state': {'params', 'params_ema', 'opt_state',
'step', ...}}`` (flax state dicts). This tool converts the parameters, the EMA parameters and
Adam's moments (``official_to_project``), and writes them as this project's orbax checkpoint at
the same step, so ``shortcut_jax.main`` resumes training from it and ``shortcut_jax.evaluate``
samples from it::

    python -m shortcut_jax.import_official --pickle=ckpt.pkl \\
        --config=experiments/imagenet.py:variant=B --workdir=workdirs/imagenet_b_imported

Unpickling runs code from the file: only import pickles from a source you trust.

The config must describe the same network (the tool checks every parameter shape); the data
shape and class count are read from the pickle (``--image_size`` gives the spatial size, which
the parameters do not determine).
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shortcut_jax import checkpoint, config_lib, data
from shortcut_jax.experiment import Experiment
from shortcut_jax.models import convert


def load_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        obj = pickle.load(f)  # trusted sources only (see module docstring)
    if not isinstance(obj, Mapping) or "train_state" not in obj:
        raise ValueError(f"{path}: expected a pickle of {{'train_state': {{...}}}} from the reference code")
    ts = obj["train_state"]
    missing = {"params", "step"} - set(ts)
    if missing:
        raise ValueError(f"{path}: train_state lacks {sorted(missing)}")
    return ts


def _find_adam_moments(tree: Any) -> Optional[Mapping]:
    """The first sub-dict holding Adam's ``mu``/``nu`` in a reference optimiser state dict."""
    if isinstance(tree, Mapping):
        if "mu" in tree and "nu" in tree:
            return tree
        for value in tree.values():
            found = _find_adam_moments(value)
            if found is not None:
                return found
    return None


def _with_adam_moments(opt_state, count, mu, nu):
    """Replace count/mu/nu of the ScaleByAdamState inside an optax state (any nesting of tuples)."""
    if isinstance(opt_state, optax.ScaleByAdamState):
        return optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        return tuple(_with_adam_moments(s, count, mu, nu) for s in opt_state)
    if hasattr(opt_state, "_fields") and hasattr(opt_state, "inner_state"):  # masked / wrapped states
        return opt_state._replace(inner_state=_with_adam_moments(opt_state.inner_state, count, mu, nu))
    return opt_state


def _check_shapes(name: str, converted, abstract) -> None:
    flat_c = convert.flatten(converted)
    flat_a = convert.flatten(jax.tree.map(lambda x: x, abstract, is_leaf=lambda x: hasattr(x, "shape")))
    if set(flat_c) != set(flat_a):
        extra = sorted("/".join(k) for k in set(flat_c) - set(flat_a))[:5]
        lacking = sorted("/".join(k) for k in set(flat_a) - set(flat_c))[:5]
        raise config_lib.ConfigError(
            f"{name}: the pickle's network differs from the config's (extra {extra}, missing {lacking});"
            " pick the config variant the checkpoint was trained with"
        )
    for key, value in flat_c.items():
        if tuple(np.shape(value)) != tuple(flat_a[key].shape):
            raise config_lib.ConfigError(
                f"{name}: {'/'.join(key)} has shape {np.shape(value)} in the pickle and {flat_a[key].shape} in the"
                " config; pick the matching model variant / patch size / class count"
            )


def import_checkpoint(train_state: Mapping, config, workdir: str, *, image_size: int = 32) -> int:
    """Write the reference train state as this project's checkpoint; returns the step."""
    arch = convert.infer_official_config(train_state["params"])
    spec = data.DataSpec(shape=(image_size, image_size, arch["in_channels"]),
                         num_classes=arch["num_classes"], kind="images")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; import into a fresh --workdir")
    exp = Experiment(config, workdir, spec=spec)

    params = convert.official_to_project(train_state["params"])
    _check_shapes("params", params, exp.abstract_state.params)
    ema_source = train_state.get("params_ema") or train_state["params"]
    ema = convert.official_to_project(ema_source)
    step = int(np.asarray(train_state["step"]))

    def placed(tree, shardings):
        return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), s), tree, shardings)

    state = exp.init_state()
    params = placed(params, exp.state_shardings.params)
    ema_params = tuple(placed(ema, sh) for sh in exp.state_shardings.ema_params)
    opt_state = state.opt_state
    moments = _find_adam_moments(train_state.get("opt_state", {}))
    if moments is not None:
        mu = convert.official_to_project(moments["mu"])
        nu = convert.official_to_project(moments["nu"])
        _check_shapes("opt_state.mu", mu, exp.abstract_state.params)
        count = jnp.asarray(np.asarray(moments.get("count", step)), jnp.int32)
        opt_state = _with_adam_moments(opt_state, count, placed(mu, exp.state_shardings.params),
                                       placed(nu, exp.state_shardings.params))
    state = state.replace(step=jnp.asarray(step, jnp.int32), params=params, ema_params=ema_params, opt_state=opt_state)
    os.makedirs(workdir, exist_ok=True)
    with checkpoint.Checkpointer(ckpt_dir, async_save=False) as ckpt:
        ckpt.save(step, state, data_state={}, meta=exp.meta, force=True)
    exp.close()
    return step


def main(argv):
    del argv
    from absl import flags, logging

    f = flags.FLAGS
    step = import_checkpoint(load_pickle(f.pickle), f.config, f.workdir, image_size=f.image_size)
    logging.info("imported step %d into %s", step, f.workdir)
    print(f"imported step {step} into {f.workdir}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config describing the same network.")
    flags.DEFINE_string("pickle", None, "Reference checkpoint (pickle). Trusted sources only.")
    flags.DEFINE_string("workdir", None, "Fresh run directory to write the checkpoint into.")
    flags.DEFINE_integer("image_size", 32, "Spatial size of the model input (32 for 256px SD-VAE latents).")
    flags.mark_flags_as_required(["config", "pickle", "workdir"])
    app.run(main)
