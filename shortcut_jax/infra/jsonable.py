"""Conversion of run records (configs, metadata, data positions) to JSON types, used by the
checkpoint's JSON items and the run manifest alike."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np


def jsonable(obj: Any, *, strict: bool = False) -> Any:
    """``obj`` with ConfigDicts, tuples, sets, numpy and jax values turned into JSON types.

    Unknown objects raise TypeError when ``strict`` (what is saved must come back equal), and
    become their ``repr`` otherwise (a manifest records what it can).
    """
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, strict=strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, strict=strict) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v, strict=strict) for v in obj), key=repr)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "__array__") and hasattr(obj, "shape"):  # numpy and jax arrays
        return np.asarray(obj).tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if strict:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable; convert it first.")
    return repr(obj)
