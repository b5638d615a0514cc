"""Prometheus metrics (vLLM's names under the ``allmos:`` prefix) and the periodic stats log line.

One ``ServerMetrics`` per server owns its own ``CollectorRegistry`` (no process-wide state). Core-side
numbers (running/waiting, KV usage, prefix cache, preemptions) arrive with every step message; request
timings are observed by the front end as outputs reach it.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from allmos.server.protocol import CoreStats

logger = logging.getLogger("allmos.server")

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # the front end's own CPU time and memory
        r, labels = self.registry, ["model_name"]

        def gauge(name, doc):
            return Gauge(f"allmos:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(f"allmos:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(f"allmos:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.num_free_blocks = gauge("num_free_kv_blocks", "KV-cache blocks not held by any request.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (KV blocks taken back).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.success = Counter("allmos:request_success", "Requests finished, by reason.",
                               ["model_name", "finished_reason"], registry=r)
        self._success = {reason: self.success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's successive outputs.",
                             _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling.",
                                    _LATENCY_BUCKETS)
        self.core = CoreStats()
        self.log_window = _LogWindow()

    def watch_core_process(self, pid: int) -> None:
        """Export the engine-core process's CPU time and memory too (``allmos_engine_core_process_*``)."""
        ProcessCollector(namespace="allmos_engine_core", pid=lambda: pid, registry=self.registry)

    # ------------------------------------------------------------------ observations
    def observe_core_stats(self, stats: CoreStats) -> None:
        prev, self.core = self.core, stats
        self.num_running.set(stats.num_running_reqs)
        self.num_waiting.set(stats.num_waiting_reqs)
        self.kv_usage.set(stats.kv_cache_usage)
        self.num_free_blocks.set(stats.num_free_blocks)
        self.prefix_queries.inc(max(0, stats.prefix_cache_queries - prev.prefix_cache_queries))
        self.prefix_hits.inc(max(0, stats.prefix_cache_hits - prev.prefix_cache_hits))
        self.preemptions.inc(max(0, stats.num_preemptions - prev.num_preemptions))

    def observe_scheduled(self, state, item) -> None:
        self.queue_time.observe(max(0.0, item.time - state.arrival_time))

    def observe_tokens(self, state, num_new: int, now: float) -> None:
        """Called before ``state``'s times are updated with this output."""
        if state.first_token_time is None:
            self.ttft.observe(now - state.arrival_time)
            self.prompt_tokens.inc(len(state.prompt_token_ids))
            self.log_window.prompt_tokens += len(state.prompt_token_ids)
        else:
            self.itl.observe(now - state.last_token_time)
        self.generation_tokens.inc(num_new)
        self.log_window.generation_tokens += num_new

    def observe_finished(self, state, now: float) -> None:
        self.e2e.observe(now - state.arrival_time)
        self.count_finished(state.seqs[0].finish_reason or "abort")

    def count_finished(self, reason: str) -> None:
        self._success.get(reason, self._success["abort"]).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ the log line
    def log_stats(self) -> None:
        """Log throughput since the previous call, the batch and the KV cache (skipped while idle)."""
        window, now = self.log_window, time.monotonic()
        seconds = max(now - window.start, 1e-9)
        core = self.core
        busy = window.prompt_tokens or window.generation_tokens or core.num_running_reqs or core.num_waiting_reqs
        if busy:
            hit_rate = core.prefix_cache_hits / core.prefix_cache_queries if core.prefix_cache_queries else 0.0
            logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                        "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                        window.prompt_tokens / seconds, window.generation_tokens / seconds, core.num_running_reqs,
                        core.num_waiting_reqs, 100 * core.kv_cache_usage, 100 * hit_rate)
        self.log_window = _LogWindow(start=now)


class _LogWindow:
    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.prompt_tokens = 0
        self.generation_tokens = 0
