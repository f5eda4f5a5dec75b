"""Parameter layouts of the DiT and the conversions between them.

Two conversions live here: from the shortcut models' reference (official) DiT to this project's
layout, and between this project's two layouts of the blocks: unrolled (``block_0`` ..
``block_{N-1}``, ``model.scan_blocks=False``) and stacked (one ``blocks`` tree whose leaves carry a
leading layer axis of length N, ``model.scan_blocks=True``).

The reference network names modules by position (``DiTBlock_3/Dense_2``) and keeps the key,
query and value projections apart; this project names them by role and fuses q, k, v into one
matmul (``block_3/qkv``, columns ordered q, k, v). The map is exact: a converted tree gives the
reference outputs to float32 rounding (tested against golden outputs of the reference code).
``official_to_project`` gives the unrolled layout; ``match_layout`` then fits it to a model
built with ``scan_blocks=True``.

Every conversion applies to any tree with the parameters' structure (EMA parameters, Adam's
first and second moments), which is how a checkpoint is converted with its optimiser state.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The stacked layout's key (models.dit.DiT with scan_blocks=True); its leaves are [depth, ...].
STACKED_BLOCKS = "blocks"
_UNROLLED_BLOCK = re.compile(r"block_(\d+)")

# Unused by the reference network's forward pass: a 256-entry log-variance table.
_UNUSED = ("Embed_0",)

_SIMPLE = {
    ("PatchEmbed_0", "Conv_0"): ("patch_embed",),
    ("TimestepEmbedder_0", "Dense_0"): ("t_embed", "hidden"),
    ("TimestepEmbedder_0", "Dense_1"): ("t_embed", "out"),
    ("TimestepEmbedder_1", "Dense_0"): ("level_embed", "hidden"),
    ("TimestepEmbedder_1", "Dense_1"): ("level_embed", "out"),
    ("LabelEmbedder_0", "Embed_0"): ("label_embed",),
    ("FinalLayer_0", "Dense_0"): ("final", "adaln"),
    ("FinalLayer_0", "Dense_1"): ("final", "out"),
}
_BLOCK = {
    ("Dense_0",): ("adaln",),
    ("Dense_4",): ("proj",),
    ("MlpBlock_0", "Dense_0"): ("mlp", "fc1"),
    ("MlpBlock_0", "Dense_1"): ("mlp", "fc2"),
}
# Reference order of the attention projections inside a block.
_KEY, _QUERY, _VALUE = "Dense_1", "Dense_2", "Dense_3"


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def from_slash_names(flat: Mapping[str, Any]) -> dict:
    """``{'A/B/kernel': array}`` -> nested dict."""
    return unflatten({tuple(name.split("/")): value for name, value in flat.items()})


def official_to_project(tree: Mapping) -> dict:
    """Map a reference DiT parameter tree (or a tree of the same structure) to this project's."""
    flat = flatten(tree)
    out: dict[tuple, Any] = {}
    qkv: dict[tuple, dict[str, Any]] = {}
    unknown = []
    for path, value in flat.items():
        module, leaf = path[:-1], path[-1]
        if module and module[0] in _UNUSED and len(module) == 1:
            continue
        if module in _SIMPLE:
            out[_SIMPLE[module] + (leaf,)] = value
            continue
        match = re.fullmatch(r"DiTBlock_(\d+)", module[0]) if module else None
        if match is None:
            unknown.append("/".join(map(str, path)))
            continue
        block = f"block_{match.group(1)}"
        rest = module[1:]
        if rest in _BLOCK:
            out[(block,) + _BLOCK[rest] + (leaf,)] = value
        elif rest in ((_KEY,), (_QUERY,), (_VALUE,)):
            qkv.setdefault((block, leaf), {})[rest[0]] = value
        else:
            unknown.append("/".join(map(str, path)))
    if unknown:
        raise ValueError(
            "these parameters are not part of the reference DiT and cannot be converted: "
            + ", ".join(sorted(unknown)[:10])
        )
    for (block, leaf), parts in qkv.items():
        missing = {_KEY, _QUERY, _VALUE} - set(parts)
        if missing:
            raise ValueError(f"{block}: attention projections {sorted(missing)} missing for {leaf!r}")
        out[(block, "qkv", leaf)] = np.concatenate(
            [np.asarray(parts[_QUERY]), np.asarray(parts[_KEY]), np.asarray(parts[_VALUE])], axis=-1
        )
    return unflatten(out)


def infer_official_config(tree: Mapping) -> dict:
    """Read the architecture that can be read off a reference parameter tree.

    The head count cannot be read from the shapes and must come from the user.
    """
    flat = flatten(tree)
    kernel = np.shape(flat[("PatchEmbed_0", "Conv_0", "kernel")])
    depth = len({p[0] for p in flat if re.fullmatch(r"DiTBlock_\d+", str(p[0]))})
    fc1 = np.shape(flat[("DiTBlock_0", "MlpBlock_0", "Dense_0", "kernel")])
    out_features = np.shape(flat[("FinalLayer_0", "Dense_1", "kernel")])[1]
    patch = kernel[0]
    return {
        "patch_size": int(patch),
        "in_channels": int(kernel[2]),
        "width": int(kernel[3]),
        "depth": depth,
        "mlp_ratio": fc1[1] / fc1[0],
        "num_classes": int(np.shape(flat[("LabelEmbedder_0", "Embed_0", "embedding")])[0]) - 1,
        "out_channels": int(out_features // (patch * patch)),
    }


# ----------------------------------------------------------------------------- unrolled <-> stacked


def _is_block_tree(node: Any) -> bool:
    """A mapping that holds the DiT's blocks in either layout (a parameter tree, or any tree of
    the same structure: EMA parameters, Adam's moments)."""
    return isinstance(node, Mapping) and any(
        key == STACKED_BLOCKS or _UNROLLED_BLOCK.fullmatch(str(key)) for key in node
    )


def _stack(arrays: list) -> Any:
    # device arrays stay on device (jnp); host arrays stay numpy
    return jnp.stack(arrays) if any(isinstance(a, jax.Array) for a in arrays) else np.stack(arrays)


def stack_blocks(tree: Mapping) -> dict:
    """``block_0`` .. ``block_{N-1}`` -> ``blocks`` with every leaf stacked on a new leading axis
    (layer i at index i); the other entries unchanged. A tree already stacked is returned as is."""
    if STACKED_BLOCKS in tree:
        if any(_UNROLLED_BLOCK.fullmatch(str(k)) for k in tree):
            raise ValueError(f"the tree holds both {STACKED_BLOCKS!r} and block_<i> entries; it is neither layout")
        return dict(tree)
    indices = sorted(int(m.group(1)) for k in tree if (m := _UNROLLED_BLOCK.fullmatch(str(k))))
    if indices != list(range(len(indices))):
        raise ValueError(f"the blocks must be block_0 .. block_{len(indices) - 1} without gaps, got indices {indices}")
    layers = [flatten(tree[f"block_{i}"]) for i in indices]
    for i, layer in enumerate(layers[1:], start=1):
        if set(layer) != set(layers[0]):
            raise ValueError(f"block_{i} has other parameters than block_0; the blocks cannot be stacked")
        for path, value in layer.items():
            if np.shape(value) != np.shape(layers[0][path]):
                raise ValueError(
                    f"block_{i}/{'/'.join(path)} has shape {np.shape(value)}, block_0's has"
                    f" {np.shape(layers[0][path])}; the blocks cannot be stacked"
                )
    out = {k: v for k, v in tree.items() if not _UNROLLED_BLOCK.fullmatch(str(k))}
    out[STACKED_BLOCKS] = unflatten({path: _stack([layer[path] for layer in layers]) for path in layers[0]})
    return out


def unstack_blocks(tree: Mapping) -> dict:
    """``blocks`` (leaves ``[N, ...]``) -> ``block_0`` .. ``block_{N-1}``; the inverse of
    :func:`stack_blocks`. A tree already unrolled is returned as is."""
    if STACKED_BLOCKS not in tree:
        return dict(tree)
    flat = flatten(tree[STACKED_BLOCKS])
    depths = {np.shape(v)[0] if np.ndim(v) else None for v in flat.values()}
    if len(depths) != 1 or None in depths:
        raise ValueError(f"the leaves of {STACKED_BLOCKS!r} must share one leading layer axis, got lengths {depths}")
    (depth,) = depths
    out = {k: v for k, v in tree.items() if k != STACKED_BLOCKS}
    for i in range(depth):
        out[f"block_{i}"] = unflatten({path: value[i] for path, value in flat.items()})
    return out


def to_layout(tree: Any, stacked: bool) -> Any:
    """Every parameter-structured mapping inside ``tree`` moved to the stacked (``stacked=True``)
    or unrolled layout; everything else unchanged.

    ``tree`` can be a parameter tree or a whole train state (parameters, EMA trees, optimiser
    state with Adam's moments): this is how a checkpoint written with one ``model.scan_blocks``
    is evaluated or resumed with the other. Values are stacked/sliced exactly (no arithmetic)."""
    convert = stack_blocks if stacked else unstack_blocks
    return jax.tree.map(lambda node: convert(node) if _is_block_tree(node) else node, tree, is_leaf=_is_block_tree)


def is_stacked(tree: Any) -> bool:
    """Whether ``tree`` (parameters, a train state, or their abstract shapes) holds stacked blocks."""
    found = []
    jax.tree.map(
        lambda node: found.append(_is_block_tree(node) and STACKED_BLOCKS in node), tree, is_leaf=_is_block_tree
    )
    return any(found)


def match_layout(tree: Any, reference: Any) -> Any:
    """``tree`` in the layout of ``reference`` (e.g. a model's abstract parameters): the step that
    lets a tree of one layout (a reference checkpoint converted by :func:`official_to_project`,
    which is unrolled, or a checkpoint of the other ``model.scan_blocks``) fill a model of the other."""
    return to_layout(tree, is_stacked(reference))


def in_stacked_blocks(path: tuple) -> bool:
    """Whether a ``jax.tree_util`` key path leads into stacked blocks (its leaf's axis 0 is the
    layer axis)."""
    return any(getattr(key, "key", None) == STACKED_BLOCKS for key in path)


def layer_ndim(path: tuple, leaf: Any) -> int:
    """The rank of one layer's parameter: a stacked leaf's rank without the layer axis."""
    return np.ndim(leaf) - 1 if in_stacked_blocks(path) else np.ndim(leaf)


def weight_matrix_mask(params: Any) -> Any:
    """``True`` for weight matrices (one layer's parameter of rank >= 2: kernels, embeddings),
    ``False`` for biases, in either layout: the weight-decay mask ``optim.weight_decay_mask='kernels'``
    means, which a rank test on the leaves (a stacked bias is 2-D) would get wrong."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: layer_ndim(path, leaf) >= 2, params)
