"""Raising kvcore's typed errors from the Python layer, with the same
message and attributes as the C++ ones."""

from ._ext import CacheError, CacheValueError


def error(kind=CacheValueError, context="", expected="", actual="", message=None):
    text = message if message is not None else f"expected {expected} but got {actual}"
    exc = kind(f"[{context}] {text}")
    exc.context, exc.expected, exc.actual = context, expected, actual
    return exc


__all__ = ["CacheError", "error"]
