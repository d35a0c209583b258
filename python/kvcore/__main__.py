"""``python -m kvcore``: a demo, and where the C++ package lives.

    python -m kvcore demo         generate with a small random model on
                                  mlx-lm's caches and on kvcore's
    python -m kvcore inspect FILE what a prompt-cache file holds (--json
                                  for programs)
    python -m kvcore --cmake-dir  the directory for find_package(kvcore)
"""

import argparse
import sys
from pathlib import Path


def cmake_dir() -> Path:
    # Beside the installed extension (also right for an editable install).
    from . import _ext

    return Path(_ext.__file__).resolve().parent / "lib" / "cmake" / "kvcore"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kvcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cmake-dir", action="store_true",
                        help="print the directory holding kvcoreConfig.cmake")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="generate on a small random model, mlx-lm vs kvcore")
    demo.add_argument("--tokens", type=int, default=64)
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--window", type=int, default=32,
                      help="max_kv_size of the sliding-window run")
    insp = sub.add_parser("inspect", help="describe a prompt-cache file")
    insp.add_argument("file")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.cmake_dir:
        print(cmake_dir())
        return 0
    if args.command == "demo":
        from ._demo import run

        return run(tokens=args.tokens, layers=args.layers, window=args.window)
    if args.command == "inspect":
        import json

        from ._errors import CacheError
        from ._files import describe, format_description

        try:
            d = describe(args.file)
        except (CacheError, OSError) as e:
            print(f"{args.file}: {e}", file=sys.stderr)
            return 1
        print(json.dumps(d, indent=2) if args.json else format_description(d))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
