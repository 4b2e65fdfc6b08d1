"""The `jaxinfer` command line: generate, chat, perplexity and bench.

Thin: parses arguments, loads the model, calls the library, prints. Errors a user can cause (missing
file, unsupported architecture, empty text) print one line and exit non-zero instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from .cache import KV_CACHE_NAMES
from .weight_layout import DEFAULT_LAYOUT, LAYOUTS

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _common(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="preset name, HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default="auto", choices=["auto", "xla", "pallas", "cudnn"], help="attention implementation")
    p.add_argument("--quant", default=None, help="quantize the weights after loading (a recipe such as int8, int4-g64, fp8)")
    p.add_argument("--calibrate", default=None, metavar="FILE",
                   help="with --quant: weigh the quantization error by activations measured on this text file")
    p.add_argument("--keep-quantized", action="store_true",
                   help="GGUF: keep Q8_0/Q4_0/Q4_1/Q4_K weights quantized (run at the stored size)")
    p.add_argument("--kv-cache", default=None, choices=sorted(KV_CACHE_NAMES), help="quantized KV cache (default: model dtype)")
    p.add_argument("--weight-layout", default="auto", choices=["auto", *LAYOUTS],
                   help="contract-last: matrices stored contraction-last (`contract_last`, before --quant): one-row "
                        "decode takes XLA's row reduction (bf16, q/k/v packed into one matrix) or the fused row "
                        "kernel (quantized, GPU). fragments: contract-last, then int4 codes in the tensor cores' "
                        "fragment order (`fragment_order`; needs --quant int4*): batched decode on Hopper. auto "
                        "(default): contract-last, or stored with --calibrate / --keep-quantized")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="Fast LLM inference with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt, streaming the text")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    _common(g)
    c = sub.add_parser("chat", help="interactive multi-turn chat")
    c.add_argument("--system", default=None, help="optional system message")
    _common(c)
    pp = sub.add_parser("perplexity", help="perplexity of a text file")
    pp.add_argument("--file", required=True)
    pp.add_argument("--window", type=int, default=512)
    pp.add_argument("--stride", type=int, default=None, help="default: the window (no overlap)")
    _common(pp)
    try:
        from .bench import command as bench_command
    except ImportError:
        bench_command = None
    if bench_command is not None and hasattr(bench_command, "register"):
        bench_command.register(sub)
    return parser


def _load(args):
    import jax.numpy as jnp

    from .checkpoint import DEFAULT_MODEL, load

    t0 = time.perf_counter()
    if args.calibrate and not args.quant:
        raise ValueError("--calibrate needs --quant (it weighs the quantization error)")
    layout = _weight_layout(args)
    model = load(args.model or DEFAULT_MODEL, dtype=getattr(jnp, DTYPES[args.dtype]), progress=True,
                 keep_quantized=args.keep_quantized)
    from .packing import PACK_FLOAT_QKV, has_packed

    if layout in ("contract-last", "fragments"):
        from .weight_layout import contract_last

        model = model.replace(params=contract_last(model.params, pack_qkv=PACK_FLOAT_QKV and not args.quant))
    if args.quant:
        from .quant import activation_stats, quantize

        importance = activation_stats(model, _read_text(args.calibrate)) if args.calibrate else None
        model = model.replace(params=quantize(model.params, args.quant, importance=importance))
    if layout == "fragments":
        from .weight_layout import fragment_order

        model = model.replace(params=fragment_order(model.params))
    how = [args.quant] if args.quant else []
    how += ["calibrated"] if args.calibrate else []
    how += ["kept quantized"] if args.keep_quantized else []
    how += ["contraction-last"] if layout == "contract-last" else []
    how += ["contraction-last, int4 in fragment order"] if layout == "fragments" else []
    how += ["q/k/v packed"] if has_packed(model.params) else []
    print(f"loaded {model.name}{' (' + ', '.join(how) + ')' if how else ''} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return model


def _weight_layout(args) -> str:
    """The layout the loaded weights get: `DEFAULT_LAYOUT` unless the trees must keep the checkpoint's order
    (GGUF blocks kept quantized; calibration, which observes the stored matrices)."""
    keeps_order = args.calibrate or args.keep_quantized
    if args.weight_layout in ("contract-last", "fragments") and keeps_order:
        raise ValueError(f"--weight-layout {args.weight_layout} takes float weights: not with --calibrate or "
                         "--keep-quantized")
    if args.weight_layout == "fragments" and not (args.quant or "").startswith("int4"):
        raise ValueError("--weight-layout fragments lays out int4 codes: it needs --quant int4 (or int4-g32/64/128)")
    if args.weight_layout == "auto":
        return "stored" if keeps_order else DEFAULT_LAYOUT
    return args.weight_layout


def _read_text(name: str) -> str:
    """A text file's contents; a missing or empty file is a user error."""
    from pathlib import Path

    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty: no text to read")
    return text


def _cache_dtype(args):
    return KV_CACHE_NAMES.get(args.kv_cache)


def _sampling(args):
    from .sampling import Sampling

    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)


def _prompt_ids(model, args) -> list[int]:
    from .chat import encode_chat

    if model.chat_template and not args.raw:
        return encode_chat(model, [{"role": "user", "content": args.prompt}])
    return model.encode(args.prompt)


def _stream_reply(model, ids, args) -> tuple[str, dict]:
    """Stream one reply to stdout; returns the text and timings (compilation excluded by a warm-up)."""
    from .generate import stream

    kwargs = dict(sampling=_sampling(args), seed=args.seed, impl=args.impl, cache_dtype=_cache_dtype(args))
    t0 = time.perf_counter()
    for _ in stream(model, [ids], max_new_tokens=2, **kwargs):  # compiles this prompt bucket and the step
        pass
    compile_s = time.perf_counter() - t0
    pieces, n, t_first, t0 = [], 0, None, time.perf_counter()
    for chunk in stream(model, [ids], max_new_tokens=args.max_new_tokens, **kwargs):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        pieces.append(chunk.texts[0])
        print(chunk.texts[0], end="", flush=True)
    t_end = time.perf_counter()
    print()
    stats = {
        "prompt_tokens": len(ids),
        "prompt_tps": len(ids) / (t_first - t0),
        "gen_tokens": n,
        "gen_tps": (n - 1) / (t_end - t_first) if n > 1 else float("nan"),
        "warmup_s": compile_s,
    }
    return "".join(pieces), stats


def _print_stats(stats):
    print(
        f"prompt: {stats['prompt_tokens']} tokens, {stats['prompt_tps']:.1f} tok/s | "
        f"generation: {stats['gen_tokens']} tokens, {stats['gen_tps']:.1f} tok/s "
        f"(warm-up/compilation {stats['warmup_s']:.1f}s excluded)",
        file=sys.stderr,
    )


def cmd_generate(args):
    model = _load(args)
    _, stats = _stream_reply(model, _prompt_ids(model, args), args)
    _print_stats(stats)


def cmd_chat(args):
    from .chat import encode_chat

    model = _load(args)
    if not model.chat_template:
        raise ValueError(f"model {model.name!r} has no chat template; use `jaxinfer generate --raw`")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line, 'exit' or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("", "exit", "quit"):
            break
        messages.append({"role": "user", "content": line})
        reply, stats = _stream_reply(model, encode_chat(model, messages), args)
        messages.append({"role": "assistant", "content": reply.strip()})
        _print_stats(stats)


def cmd_perplexity(args):
    from .perplexity import perplexity

    text = _read_text(args.file)
    model = _load(args)
    result = perplexity(model, text, window=args.window, stride=args.stride, impl=args.impl, progress=True)
    print(f"scored {result.scored_tokens} tokens in {result.windows} window(s); mean NLL {result.mean_nll:.4f}")
    print(f"perplexity: {result.perplexity:.4f}")


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "perplexity": cmd_perplexity}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    try:
        handler(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
