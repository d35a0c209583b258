"""The fixed table of cache classes a state or a file may name: the C++
library's (kvcore::cache_class_names), each mapped to its Python class.
Nothing outside it is ever looked up, so a file cannot make kvcore call
arbitrary attributes."""

from ._errors import error


def classes():
    import kvcore

    return {name: getattr(kvcore, name) for name in kvcore._ext.cache_class_names()}


def cache_class(name, context):
    table = classes()
    if not isinstance(name, str) or name not in table:
        raise error(context=context, expected="a cache class among " + ", ".join(sorted(table)),
                    actual=repr(name)[:80])
    return table[name]
