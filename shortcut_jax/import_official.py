"""Import a checkpoint of the reference (official) shortcut-models code into a project workdir.

Converts the parameters, the EMA parameters and Adam's moments (``official_to_project``) and
writes them as this project's orbax checkpoint at the same step, so ``shortcut_jax.main``
resumes training from it and ``shortcut_jax.evaluate`` samples from it::

    python -m shortcut_jax.import_official --pickle=ckpt.pkl \\
        --config=experiments/imagenet.py:variant=B --workdir=workdirs/imagenet_b_imported

The reference code saves a pickle holding ``{'train_state': {'params', 'params_ema', 'opt_state',
'step'}, '_timestamp': ...}``: the parameters are nested dicts; the optimiser state is optax's
own state object as the optimiser returned it (for ``optax.adamw`` a tuple of named tuples,
``(ScaleByAdamState(count, mu, nu), EmptyState(), EmptyState())``, nested deeper under
``optax.chain``). Its flax state-dict form (string keys ``'0'``, ``'1'``, ...) is accepted too.
Adam's count is the pickle's; the learning-rate schedule continues from the imported step. A
pickle without a recognisable Adam state is still imported, with a warning (``logging`` and
``warnings``) that says what its optimiser state holds; the optimiser then starts afresh.

Unpickling runs code from the file: only import pickles from a source you trust.

The config must describe the same network (the tool checks every parameter shape); the data
shape and class count are read from the pickle (``--image_size`` gives the spatial size, which
the parameters do not determine).
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shortcut_jax import config_lib, data
from shortcut_jax.infra import checkpoint
from shortcut_jax.training.experiment import Experiment
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


def _is_named_tuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _find_adam_moments(tree: Any) -> Optional[Mapping]:
    """Adam's ``{'count', 'mu', 'nu'}`` from a reference optimiser state, or None.

    Walks what a pickle can hold: optax's named tuples (``ScaleByAdamState`` inside a chain's
    tuples, or under a wrapper's ``inner_state``), plain tuples and lists, and mappings (the
    state-dict form). The first node carrying both ``mu`` and ``nu`` wins; the moments are parameter
    trees and are not searched further.
    """
    if _is_named_tuple(tree):
        if "mu" in tree._fields and "nu" in tree._fields:
            return tree._asdict()
        children = list(tree)
    elif isinstance(tree, Mapping):
        if "mu" in tree and "nu" in tree:
            return tree
        children = list(tree.values())
    elif isinstance(tree, (tuple, list)):
        children = list(tree)
    else:
        return None
    for child in children:
        found = _find_adam_moments(child)
        if found is not None:
            return found
    return None


def describe_structure(tree: Any, depth: int = 3) -> str:
    """A short summary of a pickled optimiser state: container types, fields and leaf shapes.

    Used in the warning when no Adam state is found, so that the message says what the pickle
    holds instead (``tuple(TraceState(trace=dict{...8 keys: ...}), EmptyState())``).
    """
    if _is_named_tuple(tree):
        if depth == 0:
            return f"{type(tree).__name__}(...)"
        inner = ", ".join(f"{name}={describe_structure(value, depth - 1)}" for name, value in zip(tree._fields, tree))
        return f"{type(tree).__name__}({inner})"
    if isinstance(tree, Mapping):
        keys = list(tree)
        if depth == 0 or len(keys) > 6:
            noun = "key" if len(keys) == 1 else "keys"
            return f"{type(tree).__name__}{{...{len(keys)} {noun}: {', '.join(map(str, keys[:4]))}}}"
        inner = ", ".join(f"{k!r}: {describe_structure(v, depth - 1)}" for k, v in tree.items())
        return f"{type(tree).__name__}{{{inner}}}"
    if isinstance(tree, (tuple, list)):
        if depth == 0:
            return f"{type(tree).__name__}(...{len(tree)} items)"
        return f"{type(tree).__name__}({', '.join(describe_structure(v, depth - 1) for v in tree)})"
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return f"{np.dtype(tree.dtype).name}{list(np.shape(tree))}"
    return type(tree).__name__


def _warn_no_adam_state(train_state: Mapping) -> None:
    if "opt_state" in train_state:
        found = f"opt_state holds {describe_structure(train_state['opt_state'])}"
    else:
        found = f"the train state has no opt_state (keys: {sorted(map(str, train_state))})"
    message = (
        f"no Adam state (mu/nu) found in the reference checkpoint: {found}. Parameters, EMA and step"
        " are imported; the optimiser starts afresh (zero moments, count 0), so the first updates"
        " after the import are not those the reference run would have made."
    )
    logging.getLogger(__name__).warning(message)
    warnings.warn(message, stacklevel=3)


def _with_imported_counts(opt_state, adam: optax.ScaleByAdamState, schedule_count):
    """This project's optax state with the imported Adam state and the schedule's count set.

    The learning-rate schedule (``ScaleByScheduleState``) counts optimiser steps from 0 in a run
    of this project, so after an import it must stand at the imported step, not restart its
    warmup. Walks any nesting of tuples and named tuples (chains, masked / wrapped states).
    """
    if isinstance(opt_state, optax.ScaleByAdamState):
        return adam._replace(count=jax.device_put(adam.count, opt_state.count.sharding))
    if isinstance(opt_state, optax.ScaleByScheduleState):
        return opt_state._replace(count=jax.device_put(schedule_count, opt_state.count.sharding))
    if _is_named_tuple(opt_state):
        return opt_state._replace(
            **{
                name: _with_imported_counts(value, adam, schedule_count)
                for name, value in zip(opt_state._fields, opt_state)
            }
        )
    if isinstance(opt_state, tuple):
        return tuple(_with_imported_counts(s, adam, schedule_count) for s in opt_state)
    return opt_state


def _check_shapes(name: str, converted, abstract) -> None:
    diffs = checkpoint.shape_differences(converted, abstract, limit=6)
    if diffs:
        raise config_lib.ConfigError(
            f"{name}: the pickle's network (saved) differs from the config's (current) in its parameters or"
            f" their shapes: {'; '.join(diffs)}; pick the config variant (model size, patch size, class count)"
            " the checkpoint was trained with"
        )


def import_checkpoint(train_state: Mapping, config, workdir: str, *, image_size: int = 32) -> int:
    """Write the reference train state as this project's checkpoint; returns the step."""
    arch = convert.infer_official_config(train_state["params"])
    spec = data.DataSpec(
        shape=(image_size, image_size, arch["in_channels"]), num_classes=arch["num_classes"], kind="images"
    )
    if config.model.get("fp8_amax_history", 0) and config.model.matmul_precision == "fp8":
        raise config_lib.ConfigError(
            f"model.fp8_amax_history={config.model.fp8_amax_history}: the reference checkpoint has no FP8"
            " amax histories; import with model.fp8_amax_history=0 (current scaling or bf16)"
        )
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; import into a fresh --workdir")
    moments = _find_adam_moments(train_state.get("opt_state"))
    if moments is None:  # said before anything is built or written
        _warn_no_adam_state(train_state)
    exp = Experiment(config, workdir, spec=spec)

    params = convert.match_layout(convert.official_to_project(train_state["params"]), exp.abstract_state.params)
    _check_shapes("params", params, exp.abstract_state.params)
    ema_source = train_state.get("params_ema") or train_state["params"]
    ema = convert.match_layout(convert.official_to_project(ema_source), exp.abstract_state.params)
    step = int(np.asarray(train_state["step"]))

    def placed(tree, shardings):
        return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), s), tree, shardings)

    state = exp.init_state()
    params = placed(params, exp.state_shardings.params)
    ema_params = tuple(placed(ema, sh) for sh in exp.state_shardings.ema_params)
    opt_state = state.opt_state
    if moments is not None:
        mu = convert.match_layout(convert.official_to_project(moments["mu"]), exp.abstract_state.params)
        nu = convert.match_layout(convert.official_to_project(moments["nu"]), exp.abstract_state.params)
        _check_shapes("opt_state.mu", mu, exp.abstract_state.params)
        _check_shapes("opt_state.nu", nu, exp.abstract_state.params)
        count = jnp.asarray(np.asarray(moments.get("count", step)), jnp.int32)
        adam = optax.ScaleByAdamState(
            count=count, mu=placed(mu, exp.state_shardings.params), nu=placed(nu, exp.state_shardings.params)
        )
        opt_state = _with_imported_counts(opt_state, adam, jnp.asarray(step, jnp.int32))
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
    from absl import flags
    from ml_collections import config_flags

    from shortcut_jax.infra import cli

    config_flags.DEFINE_config_file("config", None, "Config describing the same network.")
    flags.DEFINE_string("pickle", None, "Reference checkpoint (pickle). Trusted sources only.")
    flags.DEFINE_string("workdir", None, "Fresh run directory to write the checkpoint into.")
    flags.DEFINE_integer("image_size", 32, "Spatial size of the model input (32 for 256px SD-VAE latents).")
    flags.mark_flags_as_required(["config", "pickle", "workdir"])
    cli.run(main)
