"""Serving benchmark: streaming requests against an `allmos serve` (or any OpenAI-compatible) server.

Workload: the standard one (`allmos.benchmark.standard_workload`: token-id prompts of 100-1024 tokens,
100-1024 output tokens, `ignore_eos`), or with `--chat` short chat questions through
`/v1/chat/completions`. Arrivals: all at once (`--request-rate inf`, the default) or Poisson at the given
rates (several rates run one after the other). Prints request throughput, output tok/s, and p50/p90/p99
of time to first token (TTFT), inter-token latency (ITL, per token) and end-to-end latency (E2E).

    allmos serve --port 8000 &                       # or: --launch to start one here
    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 --request-rate inf 8 4

`--launch` starts `allmos serve` with `--server-args`, measures, stops it, and with `--offline` then runs
the same requests through the offline `LLM.generate` with the same engine settings, so the HTTP server's
throughput and overhead per token compare with the engine's on the same machine. The front end's CPU
seconds per streamed token come from the server's own `process_cpu_seconds_total` in `/metrics`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allmos.benchmark import standard_workload  # noqa: E402

CHAT_TOPICS = ["the moon", "volcanoes", "bread", "chess", "rivers", "owls", "the printing press", "glass",
               "tides", "coffee", "bicycles", "honey bees", "clouds", "maps", "violins", "salt"]


@dataclass
class Request:
    body: dict
    output_len: int


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def build_requests(args, model: str) -> tuple[str, list[Request]]:
    common = {"model": model, "stream": True, "temperature": args.temperature, "ignore_eos": True,
              "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if args.chat:
        out = []
        for i in range(args.num_prompts):
            question = f"Tell me about {CHAT_TOPICS[i % len(CHAT_TOPICS)]}."
            out.append(Request({**common, "messages": [{"role": "user", "content": question}],
                                "max_tokens": args.chat_output_len}, args.chat_output_len))
        return "/v1/chat/completions", out
    workload = standard_workload(args.num_prompts, args.min_input_len, args.max_input_len, args.min_output_len,
                                 args.max_output_len)
    return "/v1/completions", [Request({**common, "prompt": p, "max_tokens": m}, m)
                               for p, m in zip(workload.prompts, workload.max_tokens)]


async def sse_lines(response: httpx.Response):
    """The stream's lines as the SSE format defines them (split at \\n only, whatever the text holds)."""
    buffer = b""
    async for data in response.aiter_bytes():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")


async def send(http: httpx.AsyncClient, path: str, req: Request) -> Result:
    """One streaming request; token counts come from the per-chunk usage (exact even when chunks merge)."""
    start = time.perf_counter()
    last, tokens, result = start, 0, Result(ok=False)
    try:
        async with http.stream("POST", path, json=req.body) as response:
            if response.status_code != 200:
                return Result(ok=False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in sse_lines(response):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(ok=False, error=str(chunk["error"]))
                usage = chunk.get("usage")
                if not usage or usage["completion_tokens"] == tokens:
                    continue
                now, new = time.perf_counter(), usage["completion_tokens"] - tokens
                if tokens == 0:
                    result.ttft = now - start
                else:
                    result.itls += [(now - last) / new] * new
                tokens, last = usage["completion_tokens"], now
    except httpx.HTTPError as exc:
        return Result(ok=False, error=f"{type(exc).__name__}: {exc}")
    result.ok, result.e2e, result.output_tokens = True, last - start, tokens
    return result


async def run_rate(url: str, api_key: str | None, path: str, requests: list[Request], rate: float,
                   seed: int) -> tuple[list[Result], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=limits) as http:
        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(send(http, path, req)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return " / ".join(f"{1000 * qs[p - 1]:.1f}" for p in (50, 90, 99))


def report(rate: float, results: list[Result], seconds: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    summary = {"rate": rate, "requests": len(ok), "failed": len(results) - len(ok), "seconds": seconds,
               "req_per_s": len(ok) / seconds, "output_tok_per_s": tokens / seconds, "output_tokens": tokens}
    print(f"--- request rate {rate} req/s: {len(ok)} ok, {len(results) - len(ok)} failed, {seconds:.2f} s")
    print(f"  request throughput  {summary['req_per_s']:.2f} req/s")
    print(f"  output throughput   {summary['output_tok_per_s']:.1f} tok/s ({tokens} tokens)")
    print(f"  TTFT ms p50/p90/p99 {percentiles([r.ttft for r in ok])}")
    print(f"  ITL  ms p50/p90/p99 {percentiles([x for r in ok for x in r.itls])}")
    print(f"  E2E  ms p50/p90/p99 {percentiles([r.e2e for r in ok])}")
    for r in results:
        if not r.ok:
            print(f"  failed: {r.error}")
            break
    return summary


def scrape(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def server_counters(url: str) -> tuple[float, float, float]:
    """(front-end CPU seconds, engine-core CPU seconds, tokens generated) from the server's /metrics."""
    return (scrape(url, "process_cpu_seconds_total"), scrape(url, "allmos_engine_core_process_cpu_seconds_total"),
            scrape(url, "allmos:generation_tokens_total"))


# ---------------------------------------------------------------------- --launch / --offline
class LaunchedServer:
    def __init__(self, model: str | None, server_args: list[str], port: int) -> None:
        cmd = [sys.executable, "-m", "allmos.cli", "serve", *([model] if model else []), *server_args,
               "--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)

    def wait_ready(self, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit("the server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def engine_kwargs(server_args: list[str]) -> dict:
    """The engine settings among the server flags (for the offline run)."""
    from allmos.cli import build_parser, serve_engine_kwargs

    return serve_engine_kwargs(build_parser().parse_args(["serve", *server_args]))


def run_offline(model: str | None, kwargs: dict, requests: list[Request], chat: bool, temperature: float) -> dict:
    from allmos import LLM, SamplingParams

    llm = LLM(model, **kwargs)
    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=r.output_len) for r in requests]
    if chat:
        prompts = [llm.apply_chat_template(r.body["messages"]) for r in requests]
    else:
        prompts = [r.body["prompt"] for r in requests]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up, as the server's first request
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(o.token_ids) for o in outs)
    llm.shutdown()
    return {"seconds": seconds, "output_tokens": tokens, "output_tok_per_s": tokens / seconds,
            "cpu_us_per_token": 1e6 * cpu / tokens}


def offline_in_subprocess(argv: list[str]) -> dict:
    """The offline run in a fresh interpreter with the engine core's environment (OpenMP settings are read
    once per process, so this one's would not compare)."""
    from allmos.server.engine_client import core_environment

    out = subprocess.run([sys.executable, __file__, *argv, "--offline-worker"], env=core_environment(),
                         check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    offline = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"--- offline LLM.generate, same requests: {offline['output_tokens']} tokens in {offline['seconds']:.2f} s = "
          f"{offline['output_tok_per_s']:.1f} tok/s, CPU {offline['cpu_us_per_token']:.0f} us per token")
    return offline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--request-rate", nargs="+", default=["inf"], help="requests/s (Poisson), or inf = all at once")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--min-input-len", type=int, default=100)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--min-output-len", type=int, default=100)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--chat", action="store_true", help="short chat questions instead of the standard workload")
    p.add_argument("--chat-output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) before measuring")
    p.add_argument("--launch", action="store_true", help="start `allmos serve` here (model: --launch-model)")
    p.add_argument("--launch-model", default=None)
    p.add_argument("--server-args", default="", help="extra `allmos serve` flags for --launch (one string)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--offline", action="store_true", help="with --launch: also run the requests offline")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.offline_worker:  # the child of offline_in_subprocess
        _, requests = build_requests(args, "offline")
        result = run_offline(args.launch_model, engine_kwargs(shlex.split(args.server_args)), requests, args.chat,
                             args.temperature)
        print(json.dumps(result))
        return
    server = None
    if args.launch:
        server = LaunchedServer(args.launch_model, shlex.split(args.server_args), args.port)
        args.url = server.url
        server.wait_ready()
    summaries: dict = {"runs": []}
    try:
        model = args.model or httpx.get(args.url + "/v1/models", timeout=30, headers=(
            {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})).json()["data"][0]["id"]
        path, requests = build_requests(args, model)
        if args.warmup:
            asyncio.run(run_rate(args.url, args.api_key, path, requests[:args.warmup], float("inf"), args.seed))
        for rate_text in args.request_rate:
            rate = float(rate_text)
            before, client_cpu = server_counters(args.url), time.process_time()
            results, seconds = asyncio.run(run_rate(args.url, args.api_key, path, requests, rate, args.seed))
            summary = report(rate, results, seconds)
            client_cpu, after = time.process_time() - client_cpu, server_counters(args.url)
            tokens = after[2] - before[2]
            if tokens > 0:
                us = {name: 1e6 * (after[i] - before[i]) / tokens for i, name in enumerate(("frontend", "core"))}
                us["client"] = 1e6 * client_cpu / tokens
                summary.update({f"{k}_cpu_us_per_token": v for k, v in us.items()})
                print(f"  CPU per streamed token: front end {us['frontend']:.0f} us, engine core {us['core']:.0f} us "
                      f"(this benchmark client {us['client']:.0f} us)")
            summaries["runs"].append(summary)
    finally:
        if server is not None:
            server.stop()
    if args.launch and args.offline:
        offline = offline_in_subprocess(argv)
        summaries["offline"] = offline
        for run in summaries["runs"]:
            if run["rate"] == float("inf") and run["output_tokens"]:
                ratio = run["output_tok_per_s"] / offline["output_tok_per_s"]
                extra = (run["seconds"] - offline["seconds"]) / run["output_tokens"]
                print(f"server / offline output throughput: {ratio:.1%}; "
                      f"wall time added per streamed token: {1000 * extra:.2f} ms")
                if "core_cpu_us_per_token" in run:
                    added = (run["frontend_cpu_us_per_token"] + run["core_cpu_us_per_token"]
                             - offline["cpu_us_per_token"])
                    print(f"server CPU added per streamed token (front end + core - offline): {added:.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
