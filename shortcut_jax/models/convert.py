"""Convert parameter trees of the shortcut models' reference (official) DiT into this project's.

The reference network names modules by position (``DiTBlock_3/Dense_2``) and keeps the key,
query and value projections apart; this project names them by role and fuses q, k, v into one
matmul (``block_3/qkv``, columns ordered q, k, v). The map is exact: a converted tree gives the
reference outputs to float32 rounding (tested against golden outputs of the reference code).

The same function converts any tree with the parameters' structure (EMA parameters, Adam's
first and second moments), which is how a reference checkpoint is imported with its optimiser
state.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

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
