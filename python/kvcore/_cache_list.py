"""CacheList: the caches of one hybrid layer (for example an attention
cache beside a state-space cache), handled as one.

It only delegates to its inner caches, which do the work natively, so it is
plain Python; inner caches may be any kvcore cache or a Python subclass."""

import copy

from ._errors import error


class CacheList:
    def __init__(self, *caches):
        self.caches = caches

    def __getitem__(self, idx):
        return self.caches[idx]

    def _each(self, op, others=None):
        """op on every inner cache, all or nothing: kvcore caches are changed
        on copies, which replace the originals' contents only once every op
        has succeeded (so a failing inner cache leaves none changed)."""
        others = others if others is not None else [None] * len(self.caches)
        if all(hasattr(c, "_assign") for c in self.caches):
            staged = [copy.copy(c) for c in self.caches]
            results = [op(s, o) for s, o in zip(staged, others)]
            for c, s in zip(self.caches, staged):
                c._assign(s)
            return results
        return [op(c, o) for c, o in zip(self.caches, others)]

    def is_trimmable(self):
        return all(c.is_trimmable() for c in self.caches)

    def trim(self, n):
        results = self._each(lambda c, _: c.trim(n))
        return results[-1] if results else 0

    @property
    def state(self):
        return [(c.state, type(c).__name__) for c in self.caches]

    @state.setter
    def state(self, v):
        from ._classes import cache_class

        if not isinstance(v, (list, tuple)):
            raise error(context="CacheList.state", expected="a list of (state, class name)",
                        actual=type(v).__name__)
        caches = []
        for item in v:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise error(context="CacheList.state", expected="(state, class name) pairs",
                            actual=repr(item)[:80])
            state, name = item
            caches.append(cache_class(name, "CacheList.state").from_state(state))
        self.caches = tuple(caches)

    @classmethod
    def from_state(cls, state):
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    def filter(self, batch_indices):
        self._each(lambda c, _: c.filter(batch_indices))

    def extend(self, other):
        self._each(lambda c, o: c.extend(o), list(other.caches))

    @classmethod
    def merge(cls, caches):
        cache = cls()
        cache.caches = tuple(
            caches[0].caches[i].merge([c.caches[i] for c in caches])
            for i in range(len(caches[0].caches))
        )
        return cache

    def extract(self, idx):
        return CacheList(*(c.extract(idx) for c in self.caches))

    def prepare(self, **kwargs):
        self._each(lambda c, _: c.prepare(**kwargs))

    def finalize(self):
        self._each(lambda c, _: c.finalize())

    def size(self):
        return max((c.size() for c in self.caches), default=0)

    def empty(self):
        return self.caches[0].empty() if self.caches else True

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self.caches)
