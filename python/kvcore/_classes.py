"""The fixed table of cache classes a state or a file may name. Nothing
outside it is ever looked up, so a file cannot make kvcore call arbitrary
attributes."""

from ._errors import error


def classes():
    import kvcore

    return {
        name: getattr(kvcore, name)
        for name in (
            "KVCache",
            "ConcatenateKVCache",
            "RotatingKVCache",
            "QuantizedKVCache",
            "ChunkedKVCache",
            "ArraysCache",
            "CacheList",
            "BatchKVCache",
            "BatchRotatingKVCache",
        )
    }


def cache_class(name, context):
    table = classes()
    if not isinstance(name, str) or name not in table:
        raise error(context=context, expected="a cache class among " + ", ".join(sorted(table)),
                    actual=repr(name)[:80])
    return table[name]
