"""`allmos generate | chat | bench`: the command line over the offline API (docs/api.md).

Invariant: building the parser and printing ``--help`` import neither torch nor the engine; a command
imports them only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

DEFAULT_MODEL_HELP = "model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)"
BENCH_MODEL_HELP = ("model folder, .gguf file or hub id (default: Qwen3-0.6B with random weights, built from "
                    "benchmarks/qwen3-0.6b/config.json with load_format='dummy')")


def _engine_args(p: argparse.ArgumentParser, model_help: str = DEFAULT_MODEL_HELP,
                 model_positional: bool = False) -> None:
    if model_positional:  # `allmos serve [MODEL]`, as `vllm serve MODEL`
        p.add_argument("model", nargs="?", default=None, help=model_help)
    else:
        p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--max-model-len", type=int, default=4096, help="longest prompt + output (default: 4096)")
    p.add_argument("--max-num-seqs", type=int, default=512, help="sequences in one batch (default: 512)")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384,
                   help="tokens in one forward pass (default: 16384)")
    p.add_argument("--kvcache-block-size", type=int, default=256, help="tokens per KV block (default: 256)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, no torch.compile")
    p.add_argument("-O", "--compilation-config", type=int, default=0, choices=[0, 2, 3],
                   help="CPU: 3 compiles one decoder layer at start-up, 2 the whole forward, 0 eager (default: 0)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks that split each layer (default: 1)")
    p.add_argument("--load-format", default="auto", help="auto, safetensors, gguf or dummy (default: auto)")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="CPU weight-only quantization (default: automatic, the model's own format where it pays)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the model dtype) or fp8 (float8 e4m3: twice the tokens per byte) (default: auto)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=-1, help="-1 or 0 is off (default: -1)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per reply (default: 128)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none)")


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens, kvcache_block_size=a.kvcache_block_size,
                dtype=a.dtype, device=a.device, enforce_eager=a.enforce_eager,
                tensor_parallel_size=a.tensor_parallel_size, load_format=a.load_format, quantization=a.quantization,
                kv_cache_dtype=a.kv_cache_dtype, compilation_config=a.compilation_config)


def _params(a: argparse.Namespace):
    from allmos import SamplingParams

    return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_tokens=a.max_tokens,
                          seed=a.seed)


def cmd_generate(a: argparse.Namespace) -> None:
    prompts = a.prompt
    if not prompts:
        if sys.stdin.isatty():
            raise ValueError("no prompt: give prompts as arguments or pipe them in, one per line")
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    from allmos import LLM

    llm = LLM(a.model, **_engine_kwargs(a))
    for out in llm.generate(prompts, _params(a), use_tqdm=False):
        print(out.text if len(prompts) == 1 else f"### {out.prompt}\n{out.text}\n")


def _user_turns(a: argparse.Namespace, interactive: bool) -> Iterator[str]:
    """The user's turns: ``--message`` values, else terminal input (with a ``you>`` prompt), else one
    turn per non-empty line of piped stdin (no prompt, nothing echoed). ``/exit`` or ``/quit`` ends."""
    if a.message:
        yield from a.message
        return
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            line = line.rstrip("\n")
            if not line.strip():
                continue
        if line.strip() in ("/exit", "/quit"):
            return
        yield line


def cmd_chat(a: argparse.Namespace) -> None:
    from allmos import LLM

    interactive = not a.message and sys.stdin.isatty()
    llm = LLM(a.model, **_engine_kwargs(a))
    params = _params(a)
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    for user in _user_turns(a, interactive):
        history.append({"role": "user", "content": user})
        prompt = llm.apply_chat_template(history)
        if interactive:
            print("assistant> ", end="", flush=True)
        text = ""
        for delta in llm.stream(prompt, params):
            text += delta["text"]
            print(delta["text"], end="", flush=True)
        print()
        history.append({"role": "assistant", "content": text})


def cmd_bench(a: argparse.Namespace) -> None:
    from allmos.benchmark import run_throughput, standard_workload

    workload = standard_workload(a.num_seqs, a.min_input_len, a.max_input_len, a.min_output_len, a.max_output_len)
    kwargs = _engine_kwargs(a)
    if a.load_format == "auto":
        kwargs.pop("load_format")  # run_throughput picks "dummy" for a folder without weights
    result = run_throughput(a.model, workload, **kwargs)
    print(f"Total: {result.output_tokens}tok, Time: {result.seconds:.2f}s, Throughput: {result.tokens_per_s:.2f}tok/s")


def serve_engine_kwargs(a: argparse.Namespace) -> dict:
    """The ``LLM`` keyword arguments among ``allmos serve``'s flags."""
    return dict(_engine_kwargs(a), gpu_memory_utilization=a.gpu_memory_utilization,
                enable_prefix_caching=a.enable_prefix_caching, num_kvcache_blocks=a.num_kvcache_blocks, seed=a.seed)


def cmd_serve(a) -> None:
    import os

    try:
        from allmos.server.api_server import ServerArgs, run_server
    except ImportError as exc:
        if exc.name not in ("fastapi", "starlette", "uvicorn", "msgspec", "prometheus_client"):
            raise
        raise SystemExit(f"allmos serve needs the server's dependencies ({exc.name} is missing): "
                         "pip install 'allmos[serve]'") from None

    engine = serve_engine_kwargs(a)
    api_key = a.api_key or os.environ.get("ALLMOS_API_KEY")
    run_server(ServerArgs(model=a.model, host=a.host, port=a.port, api_key=api_key,
                          served_model_name=tuple(a.served_model_name or ()), chat_template=a.chat_template,
                          log_level=a.log_level, max_queued_requests=a.max_queued_requests, engine=engine))


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs: pip install 'allmos[serve]')",
                       description="Serve MODEL (default: the embedded SmolLM2) over an OpenAI-compatible HTTP API: "
                                   "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, and a chat "
                                   "page at /.")
    _engine_args(s, model_positional=True)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $ALLMOS_API_KEY)")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model argument)")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--num-kvcache-blocks", type=int, default=None, help="fixed KV-cache size in blocks")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chat-template", default=None, help="Jinja chat template: a file or the template itself")
    s.add_argument("--max-queued-requests", type=int, default=4096,
                   help="requests allowed to wait beyond max-num-seqs; more get 503")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    s.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="allmos", description="allmos: fast LLM inference (docs/api.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete prompts (arguments, or one per line of stdin)",
                       description="Complete each prompt greedily (by default) and print the completions.")
    _engine_args(g)
    _sampling_args(g)
    g.add_argument("prompt", nargs="*", help="prompt text (default: read one prompt per line from stdin)")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="chat through the model's chat template (interactive, piped, or --message)",
                       description="Chat through the model's chat template. On a terminal it prompts 'you> '; "
                                   "with piped stdin each non-empty line is a user turn and only the replies "
                                   "are printed. /exit or /quit ends the chat.")
    _engine_args(c)
    _sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--message", action="append", help="a user turn (repeatable); without it, read from stdin")
    c.set_defaults(func=cmd_chat)
    b = sub.add_parser("bench", help="throughput on the standard workload (random Qwen3-0.6B without --model)",
                       description="Time one generate over the standard workload (benchmarks/README.md) "
                                   "and print the output tokens per second.")
    _engine_args(b, BENCH_MODEL_HELP)
    b.add_argument("--num-seqs", type=int, default=256, help="requests (default: 256)")
    b.add_argument("--min-input-len", type=int, default=100, help="shortest prompt in tokens (default: 100)")
    b.add_argument("--max-input-len", type=int, default=1024, help="longest prompt in tokens (default: 1024)")
    b.add_argument("--min-output-len", type=int, default=100, help="fewest output tokens (default: 100)")
    b.add_argument("--max-output-len", type=int, default=1024, help="most output tokens (default: 1024)")
    b.set_defaults(func=cmd_bench)
    _add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:  # bad input (model, option, prompt): a message, not a traceback
        parser.exit(2, f"allmos {args.command}: error: {exc}\n")


if __name__ == "__main__":
    main()
