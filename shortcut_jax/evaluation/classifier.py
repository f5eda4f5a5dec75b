"""A small CIFAR-10 classifier whose penultimate features define the classifier Frechet distance.

Inception weights cannot be loaded on machines without internet access, so sample quality on
32x32 images is measured in the feature space of a network trained here instead (see
``feature_distance``). Scores computed this way are a *classifier Frechet distance* (CFD): they
use the FID formula but not the Inception network, so they are not comparable with published
FID numbers and must never be reported as FID.

Network (``ResNet9``): the residual "ResNet-9" layout for CIFAR-10 -- conv-BN-ReLU stages of
widths 64-128-256-512, max-pooling after the last three, residual blocks of two conv-BN-ReLU
after the second and fourth stage, global pooling to a 512-d feature vector and a linear head.
Reaches about 93-94% test accuracy in 20 epochs of SGD with a one-cycle schedule.

The module also holds what training and evaluation share: on-device augmentation (random crop
with reflect padding, horizontal flip), the train step, accuracy, decoding an image folder into
one uint8 array (cached as ``.npz``), and saving/loading weights as a portable ``.npz`` plus a
JSON description.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from shortcut_jax.infra import files

__all__ = [
    "DEFAULT_CONFIG",
    "ResNet9",
    "TrainState",
    "accuracy",
    "augment_batch",
    "build_model",
    "create_train_state",
    "features",
    "images_to_float",
    "init_variables",
    "load_classifier",
    "load_image_folder",
    "logits",
    "make_optimizer",
    "make_train_step",
    "normalize_config",
    "one_cycle_schedule",
    "prng_key",
    "save_classifier",
    "subset_indices",
    "variables_fingerprint",
]

DEFAULT_CONFIG: dict[str, Any] = {
    "name": "resnet9",
    "widths": [64, 128, 256, 512],
    "num_classes": 10,
    "image_size": 32,
    # Average pooling gives features that are sums over many positions, closer to Gaussian than
    # a max, which is what the Frechet distance's Gaussian fit assumes.
    "pool": "avg",
    # Keeps the initial logits small so the early large learning rates do not saturate softmax.
    "logit_scale": 0.125,
}

WEIGHTS_FILE = "weights.npz"
CONFIG_FILE = "classifier.json"


def normalize_config(config: dict | None) -> dict:
    """The full architecture description, defaults filled in and checked."""
    out = dict(DEFAULT_CONFIG)
    if config:
        unknown = sorted(set(config) - set(DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"unknown classifier config keys {unknown}; known: {sorted(DEFAULT_CONFIG)}")
        out.update(config)
    if out["name"] != "resnet9":
        raise ValueError(f"classifier name must be 'resnet9', got {out['name']!r}")
    out["widths"] = [int(w) for w in out["widths"]]
    if len(out["widths"]) != 4 or min(out["widths"]) < 1:
        raise ValueError(f"widths must be four positive ints, got {out['widths']}")
    if out["pool"] not in ("avg", "max"):
        raise ValueError(f"pool must be 'avg' or 'max', got {out['pool']!r}")
    out["num_classes"] = int(out["num_classes"])
    out["image_size"] = int(out["image_size"])
    # Three 2x poolings must leave at least one pixel.
    if out["image_size"] < 8 or out["image_size"] % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {out['image_size']}")
    out["logit_scale"] = float(out["logit_scale"])
    return out


# ---------------------------------------------------------------- network

# Uniform with variance 1 / (3 fan_in): the initialisation the ResNet-9 recipe (learning rate,
# weight decay) was tuned with.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class _ConvBN(nn.Module):
    features: int
    pool: bool = False
    dtype: Any = jnp.float32
    precision: Any = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(
            self.features,
            (3, 3),
            padding="SAME",
            use_bias=False,
            dtype=self.dtype,
            precision=self.precision,
            kernel_init=_KERNEL_INIT,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, dtype=self.dtype, name="bn")(x)
        x = nn.relu(x)
        if self.pool:
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x


class _Residual(nn.Module):
    features: int
    dtype: Any = jnp.float32
    precision: Any = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, precision=self.precision, bn_momentum=self.bn_momentum)
        y = _ConvBN(self.features, name="a", **kw)(x, train)
        y = _ConvBN(self.features, name="b", **kw)(y, train)
        return x + y


class ResNet9(nn.Module):
    """``__call__(x [B, H, W, 3] in [-1, 1], train) -> (logits [B, C] f32, features [B, D] f32)``."""

    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 10
    pool: str = "avg"
    logit_scale: float = 0.125
    dtype: Any = jnp.float32
    precision: Any = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, precision=self.precision, bn_momentum=self.bn_momentum)
        w0, w1, w2, w3 = self.widths
        x = jnp.asarray(x, self.dtype)
        x = _ConvBN(w0, name="prep", **kw)(x, train)
        x = _ConvBN(w1, pool=True, name="layer1", **kw)(x, train)
        x = _Residual(w1, name="res1", **kw)(x, train)
        x = _ConvBN(w2, pool=True, name="layer2", **kw)(x, train)
        x = _ConvBN(w3, pool=True, name="layer3", **kw)(x, train)
        x = _Residual(w3, name="res3", **kw)(x, train)
        # Features in float32 whatever the compute dtype, so that statistics accumulated over
        # thousands of images do not inherit bf16 rounding.
        x = x.astype(jnp.float32)
        feats = x.mean(axis=(1, 2)) if self.pool == "avg" else x.max(axis=(1, 2))
        out = nn.Dense(
            self.num_classes, dtype=jnp.float32, precision=self.precision, kernel_init=_KERNEL_INIT, name="head"
        )(feats)
        return out * self.logit_scale, feats


def build_model(config: dict | None = None, *, dtype=jnp.float32, precision=None) -> ResNet9:
    """The network for ``config``; ``dtype`` is the compute dtype (parameters stay float32)."""
    c = normalize_config(config)
    return ResNet9(
        widths=tuple(c["widths"]),
        num_classes=c["num_classes"],
        pool=c["pool"],
        logit_scale=c["logit_scale"],
        dtype=dtype,
        precision=precision,
    )


def prng_key(seed: int) -> jax.Array:
    """A key of the ``rbg`` generator, for initialisation and augmentation.

    Its streams may differ between backends, which does not matter for these uses, and it
    compiles several times faster than the default threefry, whose bit mixing costs XLA's CPU
    compiler about a second per random tensor.
    """
    return jax.random.key(seed, impl="rbg")


def init_variables(model: ResNet9, rng, image_size: int = 32) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` for a freshly initialised ``model``.

    ``rng`` is a key or an int seed (turned into :func:`prng_key`).
    """
    if isinstance(rng, int):
        rng = prng_key(rng)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return dict(jax.jit(lambda r: model.init(r, x, train=False))(rng))


def logits(model: ResNet9, variables, images) -> jax.Array:
    """Eval-mode (running BatchNorm statistics) logits of images in [-1, 1]."""
    return model.apply(variables, images, train=False)[0]


def features(model: ResNet9, variables, images) -> jax.Array:
    """Eval-mode penultimate features [N, D] (after global pooling) of images in [-1, 1]."""
    return model.apply(variables, images, train=False)[1]


# ---------------------------------------------------------------- training


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def one_cycle_schedule(peak_lr: float, total_steps: int, warmup_fraction: float = 0.2) -> optax.Schedule:
    """Linear ramp 0 -> ``peak_lr`` over the first ``warmup_fraction`` of steps, then linear to 0."""
    total_steps = max(int(total_steps), 1)
    warmup = min(max(int(round(warmup_fraction * total_steps)), 1), total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak_lr, warmup),
            optax.linear_schedule(peak_lr, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def make_optimizer(
    learning_rate, *, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True
) -> optax.GradientTransformation:
    """SGD with (coupled, L2-style) weight decay, as the ResNet-9 recipe was tuned with."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
    )


def create_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    # Copies, because the train step donates its state: without them the first step would
    # delete the caller's ``variables`` along with it.
    params = jax.tree.map(jnp.copy, variables["params"])
    batch_stats = jax.tree.map(jnp.copy, variables["batch_stats"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params))


def images_to_float(images) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1] (the data module's mapping); floats pass through."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / jnp.float32(127.5) - jnp.float32(1.0)
    return images.astype(jnp.float32)


def augment_batch(key, images, pad: int = 4) -> jax.Array:
    """Random ``pad``-pixel translation (reflect padding, then crop) and horizontal flip."""
    x = images_to_float(images)
    b, h, w, c = x.shape
    k_crop, k_flip = jax.random.split(key)
    # Reflection keeps the border statistics natural; zero padding would teach the network a
    # black frame that never occurs in test or generated images.
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def _loss(model, params, batch_stats, x, labels, label_smoothing):
    (out, _), updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    targets = optax.smooth_labels(jax.nn.one_hot(labels, out.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(out, targets).mean()
    acc = (out.argmax(-1) == labels).mean()
    return loss, (updates["batch_stats"], acc)


def make_train_step(
    model: ResNet9, tx: optax.GradientTransformation, *, label_smoothing: float = 0.1, augment: bool = True
) -> Callable:
    """Jitted ``step(state, images, labels, indices, key) -> (state, {'loss', 'accuracy'})``.

    ``images`` [N, H, W, 3] (uint8, or float in [-1, 1]) and ``labels`` [N] are the whole
    training set, kept on the device; ``indices`` [B] picks this step's batch, so only indices
    travel from the host each step. ``state`` is donated.
    """

    def step(state: TrainState, images, labels, indices, key):
        x = images[indices]
        y = labels[indices]
        x = augment_batch(key, x) if augment else images_to_float(x)
        grad_fn = jax.value_and_grad(lambda p: _loss(model, p, state.batch_stats, x, y, label_smoothing), has_aux=True)
        (loss, (batch_stats, acc)), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new, {"loss": loss, "accuracy": acc}

    return jax.jit(step, donate_argnums=0)


# Modules are hashable dataclasses, so one compilation serves every call with an equal model
# (e.g. the per-epoch evaluations of a training run).
@functools.partial(jax.jit, static_argnums=0)
def _predict(model: ResNet9, variables, images) -> jax.Array:
    return logits(model, variables, images_to_float(images)).argmax(-1)


def accuracy(model: ResNet9, variables, images, labels, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode, on images [N, H, W, 3] (uint8 or float in [-1, 1])."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    n = len(images)
    if n == 0:
        raise ValueError("no images to evaluate")
    batch_size = min(batch_size, n)
    correct = 0
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        m = len(chunk)
        if m < batch_size:
            # One shape for every call, so the last chunk needs no second compilation.
            chunk = np.concatenate([chunk, np.zeros((batch_size - m, *chunk.shape[1:]), chunk.dtype)])
        pred = np.asarray(_predict(model, variables, chunk))[:m]
        correct += int((pred == labels[start : start + m]).sum())
    return correct / n


# ---------------------------------------------------------------- data


def subset_indices(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed random subset of ``limit`` of ``n`` examples (all if no limit).

    Random rather than the first ``limit``: folders are sorted by class, so a prefix would hold
    a single class.
    """
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def _folder_key(root: str, files: Sequence[str], image_size: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image_size}\n".encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode(files: Sequence[str], image_size: int, num_workers: int) -> np.ndarray:
    from shortcut_jax.data.image_folder import load_image

    out = np.empty((len(files), image_size, image_size, 3), np.uint8)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            out[i] = load_image(files[i], image_size)

    chunk = 512
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        futures = [pool.submit(work, a, min(a + chunk, len(files))) for a in range(0, len(files), chunk)]
        for f in futures:
            f.result()
    return out


def load_image_folder(
    root: str,
    *,
    image_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    cache: bool = True,
    num_workers: int = 8,
    verbose: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Decodes a class-folder image tree into ``(uint8 [N, S, S, 3], int32 labels [N], class names)``.

    Listing, validation and decoding go through the project's image-folder reader, so pixels
    and labels are exactly those ``make_dataset`` would give. The whole folder is decoded once
    and cached as ``<root>.<S>px.npz`` next to it; the cache is reused while the file list,
    sizes and modification times are unchanged. ``limit`` keeps a fixed random subset (see
    :func:`subset_indices`); without a complete cache only that subset is decoded, and nothing is
    cached.
    """
    from shortcut_jax.data.image_folder import scan_image_folder

    root = os.path.abspath(root)
    index = scan_image_folder(root, image_size, num_workers)
    if not index.class_names:
        raise ValueError(f"{root!r} has no class sub-folders; a classifier needs labelled images.")
    key = _folder_key(root, index.files, image_size)
    cache_path = f"{root.rstrip(os.sep)}.{image_size}px.npz"
    images = None
    if cache and os.path.isfile(cache_path):
        with np.load(cache_path) as f:
            if str(f["key"]) == key:
                images = f["images"]
            elif verbose:
                print(f"cache {cache_path} is stale (the folder changed); decoding again")
    select = subset_indices(len(index.files), limit, seed)
    if images is None:
        if len(select) < len(index.files):
            images = _decode([index.files[i] for i in select], image_size, num_workers)
            return images, index.labels[select].astype(np.int32), index.class_names
        images = _decode(index.files, image_size, num_workers)
        if cache:
            files.atomic_savez(cache_path, images=images, labels=index.labels, key=np.asarray(key))
            if verbose:
                print(f"cached {len(images)} decoded images in {cache_path}")
    return images[select], index.labels[select].astype(np.int32), index.class_names


# ---------------------------------------------------------------- saving and loading


def _flatten(variables) -> dict[str, np.ndarray]:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def variables_fingerprint(variables) -> str:
    """A hash of every array (names, shapes, dtypes, values): identifies a set of weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in sorted(_flatten(variables).items()):
        value = np.ascontiguousarray(value)
        digest.update(f"{name}\0{value.shape}\0{value.dtype}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_classifier(directory: str, config: dict, variables, info: dict | None = None) -> None:
    """Writes ``weights.npz`` ('/'-joined names such as ``params/layer1/conv/kernel``) and
    ``classifier.json`` (architecture, fingerprint and ``info``, e.g. test accuracy)."""
    os.makedirs(directory, exist_ok=True)
    flat = _flatten(variables)
    meta = {
        "architecture": normalize_config(config),
        "fingerprint": variables_fingerprint(variables),
        "info": dict(info or {}),
    }
    # Atomic writes: a crash mid-save never leaves a half-written file that a later load would
    # take for a classifier.
    files.atomic_savez(os.path.join(directory, WEIGHTS_FILE), **flat)
    files.atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(meta, indent=2, sort_keys=True))


def load_classifier(directory: str) -> tuple[dict, dict, dict]:
    """``(architecture config, variables, meta)`` saved by :func:`save_classifier`.

    The arrays are checked against the shapes of the architecture they claim to be, so a
    truncated or mismatched file fails here rather than as a shape error deep inside a jit.
    """
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist; train a classifier with python -m shortcut_jax.evaluation.train_classifier first."
            )
    with open(config_path, encoding="utf-8") as f:
        meta = json.load(f)
    config = normalize_config(meta["architecture"])
    with np.load(weights_path) as f:
        flat = {k: f[k] for k in f.files}
    model = build_model(config)
    s = config["image_size"]
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)), train=False))
    expected = {
        k: (tuple(v.shape), np.dtype(v.dtype))
        for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(expected), sep="/").items()
    }
    got = {k: (tuple(v.shape), v.dtype) for k, v in flat.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(
            f"{weights_path} does not match the architecture in {config_path}: missing "
            f"{missing[:5]}, unexpected {extra[:5]}, wrong shape/dtype {wrong[:5]}"
        )
    variables = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    if meta.get("fingerprint") and variables_fingerprint(variables) != meta["fingerprint"]:
        raise ValueError(
            f"{weights_path} does not match the fingerprint recorded in {config_path}; "
            "the two files come from different saves."
        )
    return config, dict(variables), meta
