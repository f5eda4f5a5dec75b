"""Parity of the Flax FID Inception with pytorch-fid, the reference implementation.

Two modes, both building pytorch-fid's own ``InceptionV3`` (FID variant, 2048-d pool features)
with random weights from ``shortcut_jax.evaluation.inception.synthetic_torch_state_dict``
(pytorch-fid's weight download is patched out; the weights are a seeded function of the state
dict's names and shapes, so anyone can rebuild them without torch):

``--mode=golden`` (CPU is enough) runs pytorch-fid on four synthetic images of different sizes
(299x299, 256x256, 32x32 and 96x480, so the bilinear resize both enlarges and shrinks) and writes
``tests/goldens/fid_inception_golden.npz``: the images, pytorch-fid's features, the state dict's
(name, shape) list and the seed -- not the weights. ``tests/test_fid_inception.py`` checks the
Flax network against it::

    python -m benchmarks.fid_inception_golden --mode=golden \\
        --out=tests/goldens/fid_inception_golden.npz

``--mode=frechet`` (meant for a GPU) extracts features of two sets of random images (10,000
each by default) with both implementations, float32 everywhere (TF32 off in torch, HIGHEST
precision in JAX), and reports how far the Frechet distances between the sets differ
(target: at most 0.01), the Frechet distance between the two implementations' features of the
same set, the largest relative feature error, and images/s of each implementation. Results go
to ``OUT_DIR/fid_parity.json``::

    python -m benchmarks.fid_inception_golden --mode=frechet --num_images=10000 --out=results/

Needs torch, torchvision and pytorch-fid (pure Python; ``pip install --no-deps pytorch-fid``).
Where torchvision's compiled operators do not load (a CUDA torchvision wheel beside a CPU torch),
only its pure-Python model definitions are imported, which is all pytorch-fid uses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types

import numpy as np

SEED = 20261202
# 299: no resize; 256 and 32: enlarged (the usual data sizes); 96x480: enlarged along rows and
# shrunk by 1.6 along columns, where anti-aliasing (which torch does not do) would show.
GOLDEN_SIZES = [(299, 299), (256, 256), (32, 32), (96, 480)]


def import_torchvision_models():
    """torchvision, or its pure-Python part where the compiled operators fail to load."""
    try:
        import torchvision  # noqa: F401

        return "full"
    except (ImportError, RuntimeError, OSError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torchvision"] = package
    from torchvision import version

    package.__version__ = version.__version__
    import torchvision.models  # noqa: F401

    return "python-only"


def build_reference(seed: int, device: str):
    """pytorch-fid's InceptionV3 (FID variant, pool features) with synthetic weights.

    Returns ``(model, names_and_shapes)``. The state dict's names and shapes are read from
    pytorch-fid's network itself (a first construction with loading skipped); the synthetic
    weights are then loaded through pytorch-fid's own (strict) loading path.
    """
    import torch
    from unittest import mock

    from pytorch_fid import inception as pf
    from shortcut_jax.evaluation.inception import synthetic_torch_state_dict

    captured = {}

    def capture(self, state_dict, *args, **kwargs):
        captured["shapes"] = [(k, tuple(v.shape)) for k, v in self.state_dict().items()]

    with (
        mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(pf.torchvision.models.inception.Inception3, "load_state_dict", capture),
    ):
        pf.fid_inception_v3()
    names_and_shapes = captured["shapes"]
    weights = {k: torch.from_numpy(v) for k, v in synthetic_torch_state_dict(names_and_shapes, seed).items()}
    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: weights):
        model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return model.eval().to(device), names_and_shapes


def reference_features(model, images_u8: np.ndarray, device: str, batch_size: int = 100):
    """pytorch-fid's path for uint8 images: ToTensor (x / 255 in [0, 1], NCHW) -> model."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images_u8), batch_size):
            chunk = np.ascontiguousarray(images_u8[start : start + batch_size].transpose(0, 3, 1, 2))
            x = torch.from_numpy(chunk).to(device).float() / 255.0
            out.append(model(x)[0][:, :, 0, 0].cpu().numpy())
    return np.concatenate(out)


def synthetic_images(rng: np.random.Generator, n: int, h: int, w: int, smooth: int) -> np.ndarray:
    """Smooth random colour fields with a few hard-edged discs: images with both gradients and
    edges, so the resize and every layer see structure, not only noise. uint8 [n, h, w, 3]."""
    coarse = rng.uniform(0, 255, (n, smooth, smooth, 3))
    rows = np.linspace(0, smooth - 1, h)
    cols = np.linspace(0, smooth - 1, w)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, smooth - 1), np.minimum(c0 + 1, smooth - 1)
    fr, fc = (rows - r0)[None, :, None, None], (cols - c0)[None, None, :, None]
    top = coarse[:, r0][:, :, c0] * (1 - fc) + coarse[:, r0][:, :, c1] * fc
    bottom = coarse[:, r1][:, :, c0] * (1 - fc) + coarse[:, r1][:, :, c1] * fc
    x = top * (1 - fr) + bottom * fr
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        for _ in range(3):
            cy, cx, rad = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * min(h, w)
            x[i][(yy - cy) ** 2 + (xx - cx) ** 2 < rad**2] = rng.uniform(0, 255, 3)
    x += rng.normal(0, 4, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def versions() -> dict:
    import torch

    import pytorch_fid
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_fid": getattr(pytorch_fid, "__version__", "?"),
        "python": platform.python_version(),
    }


def golden(out_path: str, seed: int) -> None:
    mode = import_torchvision_models()
    model, names_and_shapes = build_reference(seed, "cpu")
    rng = np.random.default_rng(seed)
    images = [synthetic_images(rng, 1, h, w, smooth=6)[0] for h, w in GOLDEN_SIZES]
    feats = np.concatenate([reference_features(model, im[None], "cpu") for im in images])
    names = np.asarray([k for k, _ in names_and_shapes])
    ndim = np.asarray([len(s) for _, s in names_and_shapes], np.int64)
    shapes = np.full((len(names_and_shapes), 4), -1, np.int64)
    for i, (_, s) in enumerate(names_and_shapes):
        shapes[i, : len(s)] = s
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(
        out_path,
        features=feats.astype(np.float32),
        names=names,
        shapes=shapes,
        ndim=ndim,
        seed=np.asarray(seed),
        num_images=np.asarray(len(images)),
        **{f"image_{i}": im for i, im in enumerate(images)},
        reference=np.asarray(json.dumps({**versions(), "torchvision_import": mode})),
    )
    print(
        f"wrote {out_path} ({os.path.getsize(out_path) / 1e3:.0f} kB): features "
        f"{feats.shape}, |f| mean {np.abs(feats).mean():.3f}, max {np.abs(feats).max():.3f}; "
        f"{len(names)} state dict entries; torchvision import: {mode}"
    )


def frechet(out_dir: str, seed: int, num_images: int, image_size: int, batch_size: int) -> None:
    import torch

    mode = import_torchvision_models()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"

    import jax

    from shortcut_jax.evaluation import distances
    from shortcut_jax.evaluation.inception import InceptionFeatures, synthetic_torch_state_dict
    from shortcut_jax.evaluation.inception import torch_state_dict_to_variables

    model, names_and_shapes = build_reference(seed, device)
    variables = torch_state_dict_to_variables(synthetic_torch_state_dict(names_and_shapes, seed))
    extractor = InceptionFeatures(variables, batch_size=batch_size)

    rng = np.random.default_rng(seed + 1)
    sets = {
        "a": synthetic_images(rng, num_images, image_size, image_size, smooth=4),
        "b": synthetic_images(rng, num_images, image_size, image_size, smooth=8),
    }
    feats, seconds = {}, {}
    for impl in ("torch", "flax"):
        for name, images in sets.items():
            run = (lambda x: reference_features(model, x, device, batch_size)) if impl == "torch" else extractor
            run(images[:batch_size])  # compile / warm up
            if impl == "torch" and device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            feats[impl, name] = run(images)
            seconds[impl, name] = time.perf_counter() - start
    stats = {key: distances.gaussian_stats(f) for key, f in feats.items()}
    fd = {impl: distances.frechet_distance(*stats[impl, "a"], *stats[impl, "b"]) for impl in ("torch", "flax")}
    rel = max(float(np.abs(feats["flax", s] - feats["torch", s]).max() / np.abs(feats["torch", s]).max()) for s in sets)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device_torch": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "device_jax": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        **versions(),
        "torchvision_import": mode,
        "num_images_per_set": num_images,
        "image_size": image_size,
        "batch_size": batch_size,
        "seed": seed,
        "fd_a_b_torch": fd["torch"],
        "fd_a_b_flax": fd["flax"],
        "fd_a_b_abs_difference": abs(fd["torch"] - fd["flax"]),
        "fd_torch_vs_flax_same_images": {
            s: distances.frechet_distance(*stats["torch", s], *stats["flax", s]) for s in sets
        },
        "max_feature_error_relative_to_max_feature": rel,
        "images_per_second": {f"{impl}_{s}": num_images / seconds[impl, s] for impl, s in seconds},
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fid_parity.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["golden", "frechet"], required=True)
    parser.add_argument(
        "--out", required=True, help="golden: the .npz to write; frechet: the folder for fid_parity.json"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--num_images", type=int, default=10_000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=200)
    args = parser.parse_args()
    if args.mode == "golden":
        golden(args.out, args.seed)
    else:
        frechet(args.out, args.seed, args.num_images, args.image_size, args.batch_size)


if __name__ == "__main__":
    main()
