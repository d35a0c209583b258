"""Prompt-cache files: mlx-lm 0.32's safetensors layout, both ways, and the
layout of mlx-lm 0.32.0 and before (per-layer meta_state strings).

A file is checked before anything is built from it: the safetensors header
is parsed and bounded here (offsets inside the file, sizes matching shapes),
key paths must form dense lists, class names come from a fixed table, and
scalars must be what their tags say. A bad file raises CacheValueError
naming what was wrong."""

import json
import os
import struct

import mlx.core as mx
from mlx.utils import tree_flatten

from ._classes import cache_class
from ._errors import error

MAX_HEADER_BYTES = 64 << 20
MAX_DEPTH = 16  # nesting of state paths (CacheLists inside CacheLists)
MAX_NDIM = 8
MAX_STRING = 1 << 16

_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


def _bad(expected, actual, context="load_prompt_cache"):
    return error(context=context, expected=expected, actual=actual)


def read_header(file_name):
    """The safetensors header of file_name, validated: {name: entry} and the
    metadata dict. Nothing is read past the header."""
    path = os.fspath(file_name)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad("a safetensors file (8-byte header length)", f"{size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _bad(f"a header of at most {min(size - 8, MAX_HEADER_BYTES)} bytes",
                       f"a header length of {n}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad("a JSON safetensors header", f"unparsable JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad("a JSON object as header", type(header).__name__)
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad("string-to-string __metadata__", repr(metadata)[:80])
    data_size = size - 8 - n
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _bad(f"a tensor entry for {name!r}", repr(entry)[:80])
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise _bad(f"a known dtype for {name!r}", repr(dtype)[:40])
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)):
            raise _bad(f"a shape of at most {MAX_NDIM} dims in [0, 2**31) for {name!r}",
                       repr(shape)[:80])
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise _bad(f"data offsets inside the {data_size} data bytes for {name!r}",
                       repr(offsets)[:80])
        count = 1
        for d in shape:
            count *= d
        if count * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise _bad(f"{count * _ITEMSIZE[dtype]} bytes for {name!r} {dtype}{shape}",
                       f"{offsets[1] - offsets[0]} bytes")
    return header, metadata


def _dense(node, context, depth=0):
    """Nested {index: ...} dicts from dotted paths, as lists; indices must be
    exactly 0..n-1, so no path can make a list larger than the file."""
    if not isinstance(node, dict):
        return node
    if depth > MAX_DEPTH:
        raise _bad(f"paths at most {MAX_DEPTH} deep", "deeper paths", context)
    keys = sorted(node)
    if keys != list(range(len(keys))):
        raise _bad("dense list indices 0..n-1", f"indices {keys[:8]}", context)
    return [_dense(node[k], context, depth + 1) for k in keys]


def _nest(items, context):
    root = {}
    for path, value in items:
        parts = path.split(".")
        if len(parts) > MAX_DEPTH:
            raise _bad(f"paths at most {MAX_DEPTH} deep", repr(path)[:80], context)
        if not all(p.isdigit() and len(p) <= 9 for p in parts):
            raise _bad("numeric dotted paths like '0.1'", repr(path)[:80], context)
        node = root
        for p in parts[:-1]:
            node = node.setdefault(int(p), {})
            if not isinstance(node, dict):
                raise _bad("a path that is not also a leaf", repr(path)[:80], context)
        if int(parts[-1]) in node:
            raise _bad("each path once", repr(path)[:80], context)
        node[int(parts[-1])] = value
    return _dense(root, context)


def _scalar(array, kind, path):
    ctx = "load_prompt_cache"
    if kind == "scalar":
        if array.size != 1:
            raise _bad(f"one element for the scalar at {path}", f"shape {array.shape}", ctx)
        return array.item()
    if kind == "string":
        if array.ndim != 1 or array.size > MAX_STRING or not mx.issubdtype(array.dtype, mx.integer):
            raise _bad(f"a 1-D integer array for the string at {path}",
                       f"{array.dtype} {array.shape}", ctx)
        codes = array.tolist()
        if not all(0 <= c < 0x110000 for c in codes):
            raise _bad(f"code points for the string at {path}", "out-of-range values", ctx)
        return "".join(map(chr, codes))
    if kind == "none":
        return None
    raise _bad("a scalar tag among scalar, string, none", repr(kind)[:40], ctx)


def save_prompt_cache(file_name, cache, metadata=None):
    """Save a prompt cache (a list of per-layer caches) to a ``.safetensors``
    file, in mlx-lm 0.32's layout: mlx-lm loads it and kvcore loads mlx-lm's.

    Args:
        file_name (str): The file.
        cache (list): The model's caches.
        metadata (dict[str, str], optional): Saved alongside.
    """
    scalars = [""]  # non-empty, or tree_flatten would drop it

    def encode(item):
        path, data = item
        if isinstance(data, mx.array):
            return item
        if isinstance(data, (bool, int, float)):
            scalars.append((path, "scalar"))
            return path, mx.array(data)
        if isinstance(data, str):
            scalars.append((path, "string"))
            return path, mx.array([ord(c) for c in data])
        if data is None:
            scalars.append((path, "none"))
            return path, mx.array([])
        raise error(context="save_prompt_cache", expected="arrays, numbers, strings or None",
                    actual=type(data).__name__)

    arrays = dict(map(encode, tree_flatten([c.state for c in cache])))
    deepest = max((p.count(".") + 1 for p in arrays), default=0)
    if deepest > MAX_DEPTH:
        raise error(context="save_prompt_cache", expected=f"states at most {MAX_DEPTH} deep",
                    actual=f"{deepest} levels")
    classes = [type(c).__name__ for c in cache]
    meta = dict(tree_flatten([metadata or {}, classes, scalars]))
    mx.save_safetensors(os.fspath(file_name), arrays, meta)


def _load_new(arrays, meta):
    user, classes, tags = {}, [], []
    for key, value in meta.items():
        head, _, rest = key.partition(".")
        if head == "0" and rest:
            user[rest] = value
        elif head == "1":
            classes.append((rest, value))
        elif head == "2":
            tags.append((rest, value))
        else:
            raise _bad("metadata keys under 0., 1. and 2.", repr(key)[:80])
    classes = _nest(classes, "load_prompt_cache (class names)")
    tags = _nest(tags, "load_prompt_cache (scalar tags)")
    if not tags or tags[0] != "":
        raise _bad("the scalar list's leading ''", repr(tags[:1]))
    for entry in tags[1:]:
        if not isinstance(entry, list) or len(entry) != 2 or not all(
            isinstance(x, str) for x in entry
        ):
            raise _bad("(path, tag) scalar entries", repr(entry)[:80])
        path, kind = entry
        if path not in arrays:
            raise _bad("a scalar tag naming a stored array", repr(path)[:80])
        arrays[path] = _scalar(arrays[path], kind, path)
    states = _nest(arrays.items(), "load_prompt_cache (arrays)") if arrays else []
    return user, classes, states


def _ints(values, name, ctx):
    try:
        return [int(x) for x in values]
    except (TypeError, ValueError):
        raise _bad(f"integer meta_state values for {name}", repr(values)[:80], ctx) from None


def _old_state(name, state, meta):
    """A state of mlx-lm <= 0.32.0 (arrays only, scalars in meta_state
    strings) as the 0.32 state of the same cache."""
    ctx = "load_prompt_cache (meta_state)"

    def ints(n):
        if not isinstance(meta, list) or len(meta) != n:
            raise _bad(f"{n} meta_state values for {name}", repr(meta)[:80], ctx)
        return _ints(meta, name, ctx)

    if name == "CacheList":
        if not (isinstance(meta, list) and len(meta) == 2 and isinstance(meta[0], list)):
            raise _bad("CacheList meta_state ([names], [meta_states])", repr(meta)[:80], ctx)
        names, metas = meta
        if not (isinstance(state, list) and len(state) == len(names)):
            raise _bad(f"{len(names)} inner states", repr(type(state)), ctx)
        metas = metas if isinstance(metas, list) else [""] * len(names)
        return [(_old_state(n, s, m), n) for n, s, m in zip(names, state, metas)]
    if name == "ArraysCache":
        return (state, None, None)
    if name in ("BatchKVCache", "BatchRotatingKVCache"):
        if not isinstance(state, list) or len(state) != 4:
            raise _bad(f"(keys, values, offset, left_padding) for {name}", repr(type(state)), ctx)
        keys, values, offset, left_padding = state
        if not (isinstance(keys, mx.array) and keys.ndim == 4):
            raise _bad(f"rank-4 keys for {name}", f"{type(keys).__name__}", ctx)
        if name == "BatchKVCache":
            return (keys, values, offset, left_padding, keys.shape[2])
        if not isinstance(meta, list) or len(meta) != 4:
            raise _bad(f"4 meta_state values for {name}", repr(meta)[:80], ctx)
        flag = {"True": True, "False": False, "1": True, "0": False}.get(meta[3])
        if flag is None:
            raise _bad("rotated as True or False", repr(meta[3])[:40], ctx)
        max_size, ring_offset, idx = _ints(meta[:3], name, ctx)
        return (keys, values, offset, left_padding, max_size, ring_offset, idx, flag)
    if not isinstance(state, list) or len(state) != 2:
        raise _bad(f"(keys, values) for {name}", repr(type(state)), ctx)
    keys, values = state
    if name != "QuantizedKVCache" and not (
        isinstance(keys, mx.array) and isinstance(values, mx.array) and keys.ndim == 4
    ):
        raise _bad(f"rank-4 keys and values arrays for {name}",
                   f"{type(keys).__name__} {getattr(keys, 'shape', '')}", ctx)
    if name == "KVCache":
        return (keys, values, keys.shape[2])
    if name == "ConcatenateKVCache":
        return (keys, values)
    if name == "RotatingKVCache":
        keep, max_size, offset, idx = ints(4)
        return (keys, values, offset, keep, max_size, idx)
    if name == "QuantizedKVCache":
        offset, group_size, bits = ints(3)
        return (keys, values, offset, group_size, bits)
    if name == "ChunkedKVCache":
        chunk_size, start = ints(2)
        # mlx-lm set offset to the tokens held, losing start_position.
        return (keys, values, start + keys.shape[2], chunk_size, start)
    raise _bad("a cache class this layout knows", repr(name), ctx)


def _load_old(arrays, meta):
    info, user, classes = [], {}, []
    for key, value in meta.items():
        head, _, rest = key.partition(".")
        if head == "0":
            info.append((rest, value))
        elif head == "1" and rest:
            user[rest] = value
        elif head == "2":
            classes.append((rest, value))
        else:
            raise _bad("metadata keys under 0., 1. and 2.", repr(key)[:80])
    classes = _nest(classes, "load_prompt_cache (class names)")
    info = _nest(info, "load_prompt_cache (meta_state)")
    states = _nest(arrays.items(), "load_prompt_cache (arrays)") if arrays else []
    if len(info) < len(classes):
        info += [""] * (len(classes) - len(info))
    for name in classes:
        cache_class(name, "load_prompt_cache")
    states = [_old_state(n, s, m) for n, s, m in zip(classes, states, info)]
    return user, classes, states


def load_prompt_cache(file_name, return_metadata=False):
    """Load a prompt cache saved by kvcore or by mlx-lm (0.32's layout, or
    the meta_state layout of mlx-lm 0.32.0 and before).

    Args:
        file_name (str): The ``.safetensors`` file.
        return_metadata (bool): Also return the saved metadata.

    Returns:
        list or tuple(list, dict): The caches, and the metadata if asked.
    """
    read_header(file_name)
    try:
        arrays, meta = mx.load(os.fspath(file_name), return_metadata=True)
    except Exception as e:  # mlx's own reader, after our header checks
        raise _bad("a readable safetensors file", f"{type(e).__name__}: {e}") from None
    new_layout = meta.get("2.0") == ""
    user, classes, states = (_load_new if new_layout else _load_old)(dict(arrays), meta)
    if len(states) != len(classes):
        raise _bad(f"one state per class name ({len(classes)})", f"{len(states)} states")
    cache = [cache_class(c, "load_prompt_cache").from_state(s) for c, s in zip(classes, states)]
    if return_metadata:
        return cache, user
    return cache


def describe(file_name):
    """What a prompt-cache file holds, layer by layer, as plain data."""
    header, meta = read_header(file_name)
    cache, user = load_prompt_cache(file_name, return_metadata=True)
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
        if type(c).__name__ == "CacheList":
            layer["inner"] = [type(x).__name__ for x in c.caches]
        layers.append(layer)
    return {
        "file": os.fspath(file_name),
        "layout": "mlx-lm 0.32" if meta.get("2.0") == "" else "mlx-lm <= 0.32.0 (meta_state)",
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
                             "chunk_size", "start_position") if k in layer)
        inner = f" [{', '.join(layer['inner'])}]" if "inner" in layer else ""
        lines.append(f"layer {i}: {layer['class']}{inner}  {scalars}  {layer['bytes']:,} bytes")
        for a in layer["arrays"]:
            lines.append(f"    {a['path']:<12} {a['dtype']:<9} {str(tuple(a['shape'])):<22} "
                         f"{a['bytes']:,} bytes")
    return "\n".join(lines)
