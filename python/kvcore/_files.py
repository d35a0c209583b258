"""Prompt-cache files: mlx-lm 0.32's safetensors layout, both ways, and the
layout of mlx-lm 0.32.0 and before (per-layer meta_state strings).

The format and every check on a file live in the C++ library
(kvcore/files.h): these functions only pass Python caches' states in and
wrap the loaded caches in their Python classes."""

import os

import mlx.core as mx
from mlx.utils import tree_flatten

from . import _ext


def save_prompt_cache(file_name, cache, metadata=None):
    """Save a prompt cache (a list of per-layer caches) to a ``.safetensors``
    file, in mlx-lm 0.32's layout: mlx-lm loads it and kvcore loads mlx-lm's.

    Args:
        file_name (str | bytes | os.PathLike): The file.
        cache (list): The model's caches.
        metadata (dict[str, str], optional): Saved alongside.

    Raises:
        CacheValueError: file_name is not a path, or metadata is not a
            mapping of str to str.
    """
    layers = [(type(c).__name__, c.state) for c in cache]
    _ext._save_prompt_cache_states(file_name, layers, metadata)


def _load(file_name):
    return _ext._load_prompt_cache(file_name)


def load_prompt_cache(file_name, return_metadata=False):
    """Load a prompt cache saved by kvcore or by mlx-lm (0.32's layout, or
    the meta_state layout of mlx-lm 0.32.0 and before).

    Args:
        file_name (str): The ``.safetensors`` file.
        return_metadata (bool): Also return the saved metadata.

    Returns:
        list or tuple(list, dict): The caches, and the metadata if asked.
    """
    cache, metadata, _ = _load(file_name)
    if return_metadata:
        return cache, metadata
    return cache


def describe(file_name):
    """What a prompt-cache file holds, layer by layer, as plain data."""
    cache, user, layout = _load(file_name)
    layers = []
    for i, c in enumerate(cache):
        arrays = [
            {"path": f"{i}.{path}", "shape": list(a.shape), "dtype": str(a.dtype).replace("mlx.core.", ""),
             "bytes": a.nbytes}
            for path, a in tree_flatten(c.state) if isinstance(a, mx.array)
        ]
        layer = {"class": type(c).__name__, "bytes": sum(a["bytes"] for a in arrays),
                 "arrays": arrays}
        for attr in ("offset", "left_padding", "max_size", "keep", "group_size", "bits",
                     "chunk_size", "start_position"):
            value = getattr(c, attr, None)
            if isinstance(value, mx.array):  # the batch caches' per-row arrays
                value = value.tolist()
            if value is not None:
                layer[attr] = value
        if getattr(c, "scheme", "affine") != "affine":  # kvcore's own schemes
            layer["scheme"], layer["window"] = c.scheme, c.window
        if type(c).__name__ == "CacheList":
            layer["inner"] = [type(x).__name__ for x in c.caches]
        layers.append(layer)
    return {
        "file": os.fspath(file_name),
        "layout": layout,
        "metadata": user,
        "layers": layers,
        "bytes": sum(l["bytes"] for l in layers),
    }


def format_description(d):
    lines = [f"{d['file']}: {len(d['layers'])} layers, {d['bytes']:,} bytes ({d['layout']} layout)"]
    if d["metadata"]:
        lines.append("metadata:")
        lines += [f"  {k} = {v}" for k, v in sorted(d["metadata"].items())]
    for i, layer in enumerate(d["layers"]):
        scalars = ", ".join(f"{k}={layer[k]}" for k in
                            ("offset", "left_padding", "max_size", "keep", "group_size", "bits",
                             "scheme", "window", "chunk_size", "start_position") if k in layer)
        inner = f" [{', '.join(layer['inner'])}]" if "inner" in layer else ""
        lines.append(f"layer {i}: {layer['class']}{inner}  {scalars}  {layer['bytes']:,} bytes")
        for a in layer["arrays"]:
            lines.append(f"    {a['path']:<12} {a['dtype']:<9} {str(tuple(a['shape'])):<22} "
                         f"{a['bytes']:,} bytes")
    return "\n".join(lines)
