"""Trains the CIFAR-10 classifier whose features define the classifier Frechet distance (CFD).

    python -m shortcut_jax.evaluation.train_classifier \
        --train_archive ../shared/data/cifar10-train.tar.gz \
        --test_archive ../shared/data/cifar10-test.tar.gz \
        --out classifier_ckpt --epochs 20

The archives are extracted once into ``--cache_dir`` and each split is decoded once into a
uint8 ``.npz`` next to its folder; the training set then lives on the accelerator and is
augmented there (random 4-px translation with reflect padding, horizontal flip). Optimiser:
SGD with Nesterov momentum 0.9, weight decay 5e-4, one-cycle learning rate (peak 0.4 at 20% of
training), label smoothing 0.1, batch 512, bf16 convolutions on GPU/TPU.

Each epoch prints the train loss and accuracy, the test accuracy and the time. At the end
``--out`` holds ``weights.npz`` + ``classifier.json`` (architecture, test accuracy) and
``test_stats.npz``, the feature statistics of the whole test split, i.e. the reference
statistics for CFD. ``--limit N`` trains and tests on fixed random subsets of N images, for
quick checks on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from shortcut_jax.evaluation import classifier, feature_distance

TARGET_ACCURACY = 0.90


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train_archive", required=True, help=".tar/.tar.gz of the training class folders (or an extracted folder)"
    )
    parser.add_argument(
        "--test_archive", required=True, help=".tar/.tar.gz of the test class folders (or an extracted folder)"
    )
    parser.add_argument("--out", required=True, help="directory for weights.npz, classifier.json, test_stats.npz")
    parser.add_argument(
        "--cache_dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "shortcut_jax", "cifar10"),
        help="where archives are extracted and decoded arrays cached",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.4, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of training spent ramping up")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--widths", type=int, nargs=4, default=classifier.DEFAULT_CONFIG["widths"])
    parser.add_argument("--pool", choices=("avg", "max"), default=classifier.DEFAULT_CONFIG["pool"])
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype for training; auto = bfloat16 on GPU/TPU, float32 on CPU",
    )
    parser.add_argument("--limit", type=int, default=0, help="use a fixed random subset of N train and N test images")
    parser.add_argument("--workers", type=int, default=8, help="decoding threads")
    parser.add_argument("--eval_batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def resolve_folder(path: str, cache_dir: str) -> str:
    """An archive is extracted (once) into ``cache_dir``; a folder is used as it is."""
    if os.path.isdir(path):
        return path
    from shortcut_jax.data import extract_archive

    return extract_archive(path, cache_dir)


def load_split(
    path: str, cache_dir: str, *, limit: int, workers: int, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    start = time.perf_counter()
    root = resolve_folder(path, cache_dir)
    images, labels, names = classifier.load_image_folder(
        root, image_size=image_size, limit=limit or None, seed=seed, num_workers=workers, verbose=True
    )
    print(f"{root}: {len(images)} images, {len(names)} classes ({time.perf_counter() - start:.1f} s)", flush=True)
    return images, labels, names


def train(args: argparse.Namespace) -> dict:
    if args.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    train_x, train_y, names = load_split(
        args.train_archive, args.cache_dir, limit=args.limit, workers=args.workers, seed=args.seed
    )
    test_x, test_y, test_names = load_split(
        args.test_archive, args.cache_dir, limit=args.limit, workers=args.workers, seed=args.seed + 1
    )
    if names != test_names:
        raise ValueError(f"train and test folders have different classes: {names} vs {test_names}")

    config = classifier.normalize_config(
        {"widths": args.widths, "pool": args.pool, "num_classes": len(names), "image_size": train_x.shape[1]}
    )
    platform = jax.default_backend()
    dtype_name = args.dtype if args.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
    model = classifier.build_model(config, dtype=jnp.dtype(dtype_name))
    # Accuracy and the saved statistics use the exact float32 network the feature extractor uses.
    eval_model = classifier.build_model(config, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST)

    n = len(train_x)
    batch = min(args.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * args.epochs
    print(
        f"device {jax.devices()[0].device_kind} ({platform}), compute {dtype_name}; {n} train images, "
        f"batch {batch}, {steps_per_epoch} steps/epoch, {total} steps",
        flush=True,
    )

    variables = classifier.init_variables(model, classifier.prng_key(args.seed), config["image_size"])
    data_key = classifier.prng_key(args.seed + 1)
    schedule = classifier.one_cycle_schedule(args.lr, total, args.warmup)
    tx = classifier.make_optimizer(schedule, momentum=args.momentum, weight_decay=args.weight_decay)
    state = classifier.create_train_state(variables, tx)
    step_fn = classifier.make_train_step(model, tx, label_smoothing=args.label_smoothing)
    images_dev = jax.device_put(train_x)
    labels_dev = jax.device_put(train_y)

    history = []
    test_acc = float("nan")
    start_all = time.perf_counter()
    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = np.random.default_rng([args.seed, epoch]).permutation(n)[: steps_per_epoch * batch]
        order = jax.device_put(order.reshape(steps_per_epoch, batch).astype(np.int32))
        losses, accs = [], []
        for i in range(steps_per_epoch):
            state, metrics = step_fn(
                state, images_dev, labels_dev, order[i], jax.random.fold_in(data_key, epoch * steps_per_epoch + i)
            )
            losses.append(metrics["loss"])
            accs.append(metrics["accuracy"])
        loss = float(jnp.mean(jnp.stack(losses)))
        train_acc = float(jnp.mean(jnp.stack(accs)))
        train_time = time.perf_counter() - start
        test_acc = classifier.accuracy(eval_model, state.variables, test_x, test_y, batch_size=args.eval_batch)
        elapsed = time.perf_counter() - start
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss,
                "train_accuracy": train_acc,
                "test_accuracy": test_acc,
                "seconds": elapsed,
            }
        )
        print(
            f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss:.4f}  train acc {train_acc:.4f}  "
            f"test acc {test_acc:.4f}  time {elapsed:.1f} s (train {train_time:.1f} s)",
            flush=True,
        )
    total_time = time.perf_counter() - start_all

    info = {
        "test_accuracy": test_acc,
        "num_test": int(len(test_x)),
        "num_train": int(n),
        "epochs": args.epochs,
        "train_seconds": total_time,
        "class_names": list(names),
        "device": jax.devices()[0].device_kind,
        "compute_dtype": dtype_name,
        "hyperparameters": {
            k: getattr(args, k)
            for k in ("batch_size", "lr", "warmup", "momentum", "weight_decay", "label_smoothing", "seed", "limit")
        },
        "history": history,
    }
    variables = jax.device_get(state.variables)
    classifier.save_classifier(args.out, config, variables, info)
    extractor = feature_distance.FeatureExtractor(args.out, batch_size=args.eval_batch)
    stats_path = os.path.join(args.out, "test_stats.npz")
    feature_distance.reference_stats(extractor, test_x, cache_path=stats_path)
    print(
        f"saved {args.out}/{classifier.WEIGHTS_FILE}, {classifier.CONFIG_FILE} and test_stats.npz "
        f"({len(test_x)} test images, {extractor.dim}-d features); training took {total_time:.1f} s",
        flush=True,
    )
    if test_acc < TARGET_ACCURACY:
        print(
            f"WARNING: test accuracy {test_acc:.4f} is below the {TARGET_ACCURACY:.2f} target"
            + (" (expected with --limit)" if args.limit else ""),
            flush=True,
        )
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
