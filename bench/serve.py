"""Run mlx_lm.server on mlx-lm's own caches or on kvcore's.

    python bench/serve.py [--kvcore] [--disk-dir DIR] [--disk-bytes N] -- <mlx_lm.server args>

With --kvcore, kvcore.patch_mlx_lm() runs first, so the server's prompt
cache is kvcore's LRUPromptCache; --disk-dir gives it a disk tier. This is
all it takes to run a real server on kvcore: patch, then start it.
"""

import argparse
import json
import os
import sys
import threading
import time


def watch(cache, path):
    while True:
        with open(path + ".tmp", "w") as f:
            json.dump({"entries": len(cache), "nbytes": cache.nbytes,
                       "checkpoints": getattr(cache, "n_checkpoints", 0)}, f)
        os.replace(path + ".tmp", path)
        time.sleep(0.2)


def main():
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser()
    p.add_argument("--kvcore", action="store_true")
    p.add_argument("--disk-dir")
    p.add_argument("--disk-bytes", type=int, default=1 << 63)
    p.add_argument("--stats", help="write the prompt cache's entries and bytes here, as JSON, while serving")
    args = p.parse_args(argv)
    if args.kvcore:
        import kvcore

        kvcore.patch_mlx_lm()
    import mlx_lm.server as server

    make = server.LRUPromptCache
    if args.disk_dir:
        import kvcore

        def make(max_size=10, max_bytes=1 << 63):
            return kvcore.LRUPromptCache(
                max_size, max_bytes, disk_dir=args.disk_dir, disk_bytes=args.disk_bytes
            )

    def make_and_watch(*a, **kw):
        cache = make(*a, **kw)
        if args.stats:
            threading.Thread(target=watch, args=(cache, args.stats), daemon=True).start()
        return cache

    server.LRUPromptCache = make_and_watch
    sys.argv = ["mlx_lm.server"] + rest
    server.main()


if __name__ == "__main__":
    main()
