"""CacheList: the caches of one hybrid layer (for example an attention
cache beside a state-space cache), handled as one.

It only delegates to its inner caches, which do the work natively, so it is
plain Python; inner caches may be any kvcore cache or a Python subclass."""

from ._errors import error


class CacheList:
    def __init__(self, *caches):
        self.caches = caches

    def __getitem__(self, idx):
        return self.caches[idx]

    def is_trimmable(self):
        return all(c.is_trimmable() for c in self.caches)

    def trim(self, n):
        m = 0
        for c in self.caches:
            m = c.trim(n)
        return m

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
        for c in self.caches:
            c.filter(batch_indices)

    def extend(self, other):
        for c, o in zip(self.caches, other.caches):
            c.extend(o)

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
        for c in self.caches:
            c.prepare(**kwargs)

    def finalize(self):
        for c in self.caches:
            c.finalize()

    def size(self):
        return max((c.size() for c in self.caches), default=0)

    def empty(self):
        return self.caches[0].empty() if self.caches else True

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self.caches)
