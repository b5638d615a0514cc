"""Batched token sampler: penalties, filtering and a counter-based random draw.

Invariant: the token chosen for a row is a pure function of that row's logits, its
sampling parameters, its seed and its position. Nothing in a row's result depends on
the other rows, the batch size or the order of the batch, and no torch.Generator is
used. The random draw is an exponential race (Gumbel-max):

    token = argmax_i( z_i + g_i ),  z = logits / T (filtered tokens at -inf),
    g_i = -log(-log(u_i)),          u_i = hash(seed, position, i) mapped into (0, 1)

which is argmax(p_i / E_i) with E_i = -log(u_i) ~ Exp(1), so token ~ softmax(z).
The hash is counter based: a 64-bit key per row, derived on the host from
(seed, position) with the splitmix64 finalizer, then a keyed 32-bit murmur3-style mix
of the vocabulary index. The same integer arithmetic runs in the torch reference path
(int32 tensors, wrapping multiplies, masked right shifts) and in the optional Triton
kernel (uint32), so both produce the same noise bits.

Steps, same semantics as vLLM:
raw logprobs (log_softmax of the raw logits, float32) -> penalties (repetition,
frequency, presence) -> banned ids set to -inf -> greedy rows: argmax ->
temperature -> top-k -> top-p -> min-p -> random draw.

Filtering never writes a masked copy of the logits: it produces one threshold per row
in scaled-logit space (keep z >= threshold), which the draw applies on the fly. A
filter that is off leaves the values bit-for-bit unchanged, so whichever filters other
rows switch on, a row's draw is the same.

`Sampler.forward` does not synchronize with the host: it branches only on flags that
`SamplingTensors.build` computed from plain Python values.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from allmos.engine.sampling_row import GREEDY_TEMPERATURE_EPS, SamplingRow
from allmos.utils.transfer import pack_aligned, split_packed, to_device

try:  # Triton is optional: the torch path is the complete reference.
    from allmos.kernels.sampling import gumbel_argmax as triton_gumbel_argmax

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    _HAS_TRITON = False


_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN64 = 0x9E3779B97F4A7C15
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9
_SPLITMIX_M2 = 0x94D049BB133111EB
_GOLDEN32 = 0x9E3779B1
_FMIX32_M1 = 0x85EBCA6B
_FMIX32_M2 = 0xC2B2AE35
_UNIFORM_BITS = 23  # u = (2 * bits + 1) / 2**24 is exact in float32 and lies in (0, 1)
_UNIFORM_SCALE = 2.0**-24

# Triton draw kernel tiling: a fixed chunk per program (independent of the batch).
_DRAW_CHUNK = 8192
_DRAW_BLOCK = 1024
_SMALL_BATCH_DRAW_CHUNK = 1024  # the plain draw of up to _SMALL_BATCH_ROWS rows (the result does not change)
_SMALL_BATCH_ROWS = 16
TOP_P_TOPK_WIDTH = 1024  # the largest top-k under which top-p ranks a top-k selection instead of a sort
GRAPH_TOP_K = 64  # the largest top-k the decode graphs' filtered draw takes; also the least width top-p ranks


# --------------------------------------------------------------------------- hash


def _mix64(z: int) -> int:
    """splitmix64 finalizer on a Python int in [0, 2**64)."""
    z = ((z ^ (z >> 30)) * _SPLITMIX_M1) & _MASK64
    z = ((z ^ (z >> 27)) * _SPLITMIX_M2) & _MASK64
    return z ^ (z >> 31)


def noise_key(seed: int, position: int) -> int:
    """64-bit noise key of one (seed, position) pair; distinct pairs give unrelated keys."""
    seed_state = _mix64((seed + _GOLDEN64) & _MASK64)
    return _mix64((seed_state + (position + 1) * _GOLDEN64) & _MASK64)


def _to_int32(value: int) -> int:
    """Reinterpret a uint32 as a signed int32 (the bits torch stores)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _signed32(value: int) -> int:
    return _to_int32(value & _MASK32)


def _fmix32_torch_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 in place on an int32 tensor holding uint32 bits (multiplies wrap; a logical right shift
    is the arithmetic one masked); ``tmp`` is scratch of x's shape. In place: on the CPU the allocations of
    an out-of-place chain cost as much as the arithmetic."""
    for shift, multiplier in ((16, _FMIX32_M1), (13, _FMIX32_M2), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp.bitwise_and_((1 << (32 - shift)) - 1))
        if multiplier is not None:
            x.mul_(_signed32(multiplier))
    return x


def uniform_bits_torch(key_lo: torch.Tensor, key_hi: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """23 random bits per (row, vocab index): int32 [B, V] in [0, 2**23).

    key_lo, key_hi: int32 [B], the low/high halves of each row's `noise_key`.
    """
    idx = torch.arange(vocab_size, dtype=torch.int32, device=key_lo.device)  # [V]
    x = idx.mul_(_signed32(_GOLDEN32)) + key_lo[:, None]  # [B, V]
    tmp = torch.empty_like(x)
    _fmix32_torch_(x, tmp)
    _fmix32_torch_(x.bitwise_xor_(key_hi[:, None]), tmp)
    return x.bitwise_right_shift_(32 - _UNIFORM_BITS).bitwise_and_((1 << _UNIFORM_BITS) - 1)


def gumbel_noise_torch(key_lo: torch.Tensor, key_hi: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) from the counter hash: float32 [B, V]."""
    bits = uniform_bits_torch(key_lo, key_hi, vocab_size)  # [B, V]
    u = bits.mul_(2).add_(1).to(torch.float32).mul_(_UNIFORM_SCALE)
    return u.log_().neg_().log_().neg_()


# --------------------------------------------------------------------------- tensors


@dataclass
class SamplingTensors:
    """The batch as tensors on the logits' device, built once per step by `build`.

    Every per-row value is a [B] tensor; token-id lists are flattened into
    (row index, token id) pairs. The host-side flags let `Sampler.forward` skip work
    that no row needs without reading any tensor back.
    """

    vocab_size: int
    inv_temperature: torch.Tensor  # [B] float32, 1 for greedy rows
    noise_scale: torch.Tensor  # [B] float32, 1 = random draw, 0 = greedy
    top_k: torch.Tensor  # [B] int64, vocab_size when off
    top_p: torch.Tensor  # [B] float32, 1 when off
    min_p: torch.Tensor  # [B] float32, 0 when off
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    noise_key_lo: torch.Tensor  # [B] int32, uint32 bits of noise_key(seed, position)
    noise_key_hi: torch.Tensor  # [B] int32
    output_rows: torch.Tensor  # [num_output_ids] int64, rows with any penalty
    output_token_ids: torch.Tensor  # [num_output_ids] int64
    prompt_rows: torch.Tensor  # [num_prompt_ids] int64, rows with a repetition penalty
    prompt_token_ids: torch.Tensor  # [num_prompt_ids] int64
    banned_rows: torch.Tensor  # [num_banned_ids] int64
    banned_token_ids: torch.Tensor  # [num_banned_ids] int64
    seeds_host: np.ndarray  # [B] uint64, for at_positions()
    num_logprobs_cpu: list[int | None]
    max_num_logprobs: int | None  # None when no row asks for logprobs
    max_top_k: int  # largest active top_k (vocab_size when none)
    top_p_width: int  # ranked values the top-p threshold needs (see _top_k_widths)
    all_greedy: bool
    all_random: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_presence: bool
    any_frequency: bool
    any_repetition: bool
    any_banned: bool

    @property
    def batch_size(self) -> int:
        return len(self.num_logprobs_cpu)

    @property
    def any_penalty(self) -> bool:
        return self.any_presence or self.any_frequency or self.any_repetition

    @property
    def any_filter(self) -> bool:
        return self.any_top_k or self.any_top_p or self.any_min_p

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device,
              validate: bool = True, positions: Sequence[int] | None = None) -> SamplingTensors:
        """Move `rows` to `device` (a handful of host-to-device copies), validating them first unless
        the caller built them from already validated parameters (the engine's hot path).

        `positions`, when given, replaces each row's `position` (the engine passes the sequences'
        lengths, so one SamplingRow per request can be reused across steps)."""
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if validate:
            for row in rows:
                row.validate(vocab_size)
        table = _row_table(rows)  # one pass over the rows
        seeds = np.fromiter((r.seed for r in rows), dtype=np.uint64, count=len(rows))  # [B]
        floats = _to_device_rows(_float_columns(table), device)  # 7 x [B] float32
        top_k, seeds_dev = _to_device_rows([_top_k_column(table, vocab_size), seeds.astype(np.int64)], device)
        pos = table[:, 7] if positions is None else positions
        positions_dev, key_lo, key_hi = _position_tensors(seeds, np.asarray(pos, dtype=np.int64), device)
        random = table[:, 0] >= GREEDY_TEMPERATURE_EPS
        active_top_k, active_top_p, active_min_p = _active_filters(table, vocab_size)
        any_presence, any_frequency = bool((table[:, 3] != 0).any()), bool((table[:, 4] != 0).any())
        any_repetition = bool((table[:, 5] != 1).any())
        empty = torch.empty(0, dtype=torch.int64, device=device)
        output_rows = output_ids = prompt_rows = prompt_ids = banned_rows = banned_ids = empty
        if any_presence or any_frequency or any_repetition:
            output_rows, output_ids = _flatten_ids(
                rows, lambda r: r.output_token_ids if r.has_output_penalty or r.has_repetition_penalty else (),
                vocab_size, "output_token_ids", device)
        if any_repetition:
            prompt_rows, prompt_ids = _flatten_ids(
                rows, lambda r: r.prompt_token_ids if r.has_repetition_penalty else (),
                vocab_size, "prompt_token_ids", device)
        if any(r.banned_token_ids for r in rows):
            banned_rows, banned_ids = _flatten_ids(
                rows, lambda r: r.banned_token_ids, vocab_size, "banned_token_ids", device)
        num_logprobs = [r.num_logprobs for r in rows]
        requested = [k for k in num_logprobs if k is not None]
        max_top_k, top_p_width = _top_k_widths(table, active_top_k, active_top_p, vocab_size)
        return cls(
            vocab_size=vocab_size,
            inv_temperature=floats[0], noise_scale=floats[1], top_p=floats[2], min_p=floats[3],
            presence_penalty=floats[4], frequency_penalty=floats[5], repetition_penalty=floats[6],
            top_k=top_k, seeds=seeds_dev, positions=positions_dev, noise_key_lo=key_lo, noise_key_hi=key_hi,
            output_rows=output_rows, output_token_ids=output_ids,
            prompt_rows=prompt_rows, prompt_token_ids=prompt_ids,
            banned_rows=banned_rows, banned_token_ids=banned_ids,
            seeds_host=seeds,
            num_logprobs_cpu=num_logprobs,
            max_num_logprobs=max(requested) if requested else None,
            max_top_k=max_top_k, top_p_width=top_p_width,
            all_greedy=not random.any(),
            all_random=bool(random.all()),
            any_top_k=bool(active_top_k.any()),
            any_top_p=bool(active_top_p.any()),
            any_min_p=bool(active_min_p.any()),
            any_presence=any_presence,
            any_frequency=any_frequency,
            any_repetition=any_repetition,
            any_banned=banned_ids.numel() > 0,
        )


    def at_positions(self, positions: Sequence[int]) -> SamplingTensors:
        """The same rows sampling the tokens at ``positions``: only the position-dependent tensors (positions
        and noise keys) are rebuilt, in one small host-to-device copy; the others are shared with ``self``
        (read-only on the device). The engine's decode steps mostly repeat the previous step's rows."""
        pos = np.asarray(positions, dtype=np.int64).reshape(self.batch_size)
        positions_dev, key_lo, key_hi = _position_tensors(self.seeds_host, pos, self.seeds.device)
        return dataclasses.replace(self, positions=positions_dev, noise_key_lo=key_lo, noise_key_hi=key_hi)


def _position_tensors(seeds: np.ndarray, positions: np.ndarray, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """positions [B] int64 and the noise keys of (seed, position), low / high halves [B] int32, on
    ``device`` in one host-to-device copy."""
    lo, hi = _key_halves(noise_keys_np(seeds, positions.astype(np.uint64)))
    positions_dev, lo_dev, hi_dev = _to_device_rows([positions, lo, hi], device)
    return positions_dev, lo_dev.to(torch.int32), hi_dev.to(torch.int32)


def _to_device_rows(rows: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Equal-dtype 1-D host arrays -> device tensors, in one copy, each 16-byte aligned (one Triton variant
    whatever the batch size)."""
    buffer, starts = pack_aligned(rows, rows[0].dtype)
    return split_packed(to_device(buffer, device), starts, [r.size for r in rows])


def _key_halves(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 noise keys -> (low, high) uint32 bit patterns as int64 (int32 on the device)."""
    lo = (keys & np.uint64(_MASK32)).astype(np.uint32).view(np.int32).astype(np.int64)
    hi = (keys >> np.uint64(32)).astype(np.uint32).view(np.int32).astype(np.int64)
    return lo, hi


def _mix64_np(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (multiplies wrap modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_SPLITMIX_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_SPLITMIX_M2)
    return z ^ (z >> np.uint64(31))


def noise_keys_np(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Vectorized ``noise_key`` over uint64 arrays (the same bits)."""
    golden = np.uint64(_GOLDEN64)
    seed_state = _mix64_np(seeds.astype(np.uint64) + golden)
    return _mix64_np(seed_state + (positions.astype(np.uint64) + np.uint64(1)) * golden)


def _row_table(rows: list[SamplingRow]) -> np.ndarray:
    """float64 [B, 8]: temperature, top_p, min_p, presence, frequency, repetition, top_k, position
    (positions below 2**53 survive float64 exactly; seeds, up to 2**63, are read separately)."""
    return np.array([(r.temperature, r.top_p, r.min_p, r.presence_penalty, r.frequency_penalty,
                      r.repetition_penalty, r.top_k, r.position) for r in rows], dtype=np.float64).reshape(-1, 8)


def _active_filters(table: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bool [B] each: the rows whose top-k, top-p and min-p filters are on (a greedy row's never are)."""
    random = table[:, 0] >= GREEDY_TEMPERATURE_EPS
    return (random & (table[:, 6] > 0) & (table[:, 6] < vocab_size), random & (table[:, 1] < 1.0),
            random & (table[:, 2] > 0.0))


def _top_k_widths(table: np.ndarray, active_top_k: np.ndarray, active_top_p: np.ndarray,
                  vocab_size: int) -> tuple[int, int]:
    """(the largest active top-k, or the vocabulary size when none; how many of each row's largest scaled
    logits the top-p threshold ranks). When every top-p row also has a top-k of at most ``TOP_P_TOPK_WIDTH``
    (Qwen3's defaults: top_k 20, top_p 0.95), a top-k selection replaces sorting the vocabulary: the largest
    top-k rounded up to a power of two, at least ``GRAPH_TOP_K`` (so a batch ranks exactly what the decode
    graphs' filtered draw ranks, and its sums add up alike); else, or when that reaches the vocabulary, the
    whole vocabulary."""
    max_top_k = int(table[active_top_k, 6].max()) if active_top_k.any() else vocab_size
    if max_top_k <= TOP_P_TOPK_WIDTH and not (active_top_p & ~active_top_k).any():
        return max_top_k, min(vocab_size, max(GRAPH_TOP_K, 1 << (max_top_k - 1).bit_length()))
    return max_top_k, vocab_size


def _float_columns(table: np.ndarray) -> list[np.ndarray]:
    """7 x float32 [B]: inv_temperature, noise_scale, top_p, min_p, presence, frequency, repetition."""
    greedy = table[:, 0] < GREEDY_TEMPERATURE_EPS
    inv_t = np.where(greedy, 1.0, 1.0 / np.where(greedy, 1.0, table[:, 0]))
    columns = [inv_t, np.where(greedy, 0.0, 1.0), np.where(greedy, 1.0, table[:, 1]),
               np.where(greedy, 0.0, table[:, 2]), table[:, 3], table[:, 4], table[:, 5]]
    return [c.astype(np.float32) for c in columns]


def _top_k_column(table: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64 [B]: top_k as a count of kept tokens; vocab_size when off (or greedy)."""
    greedy = table[:, 0] < GREEDY_TEMPERATURE_EPS
    top_k = table[:, 6].astype(np.int64)
    return np.where(greedy | (top_k <= 0) | (top_k >= vocab_size), vocab_size, top_k)


def _flatten_ids(
    rows: list[SamplingRow], select: Callable[[SamplingRow], Sequence[int]], vocab_size: int, field: str,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs, int64 [N] each, of the id lists `select(row)` picks."""
    lists = [select(r) for r in rows]
    lengths = [len(ids) for ids in lists]
    if not any(lengths):
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty
    token_ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=sum(lengths))  # [N]
    if token_ids.min() < 0 or token_ids.max() >= vocab_size:
        raise ValueError(f"SamplingRow.{field} holds a token id outside [0, {vocab_size})")
    row_ids = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)  # [N]
    return to_device(row_ids, device), to_device(token_ids, device)


# --------------------------------------------------------------------------- output


@dataclass
class SamplerOutput:
    """Sampled tokens and (when any row asked) raw logprobs.

    logprobs / logprob_token_ids: [B, 1 + max_num_logprobs]; column 0 is the sampled
    token, then the top-k of the raw distribution in descending order. Rows that asked
    for fewer (or none) are sliced by the engine. sampled_ranks: the sampled token's
    1-based rank in the raw distribution (tokens with a strictly greater logprob + 1).
    """

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B, 1 + max_k] float32
    logprob_token_ids: torch.Tensor | None  # [B, 1 + max_k] int64
    sampled_ranks: torch.Tensor | None = None  # [B] int64, set with logprobs


# --------------------------------------------------------------------------- steps


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Repetition, then frequency, then presence penalty (vLLM): new float32 [B, V]. Built in place on its own
    copy (fresh [B, V] tensors cost as much as the arithmetic on the CPU); dividing or multiplying by 1 leaves
    an untouched entry as it was, so the values are those of the per-entry formulas."""
    x = logits.to(torch.float32, copy=True)  # [B, V]
    batch, vocab = x.shape
    counts = torch.zeros(batch * vocab, dtype=torch.float32, device=x.device)  # [B * V]
    ones = torch.ones_like(t.output_token_ids, dtype=torch.float32)
    # scatter on flat indices: index_put_(accumulate=True) would synchronize with the host on CUDA
    counts.scatter_add_(0, t.output_rows * vocab + t.output_token_ids, ones)
    counts = counts.view(batch, vocab)
    in_output = counts > 0  # [B, V]
    if t.any_repetition:
        seen = in_output.clone().view(-1)
        seen.scatter_(0, t.prompt_rows * vocab + t.prompt_token_ids, True)
        seen = seen.view(batch, vocab)
        r = t.repetition_penalty[:, None]  # [B, 1]
        positive = x > 0  # [B, V]
        x.div_(torch.where(seen & positive, r, 1.0)).mul_(torch.where(seen & ~positive, r, 1.0))
    if t.any_frequency:
        x.sub_(counts.mul_(t.frequency_penalty[:, None]))
    if t.any_presence:
        x.sub_(in_output.float().mul_(t.presence_penalty[:, None]))
    return x


def apply_banned(x: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Set banned (row, token) pairs to -inf in place on `x` (a tensor the sampler owns)."""
    x.view(-1).scatter_(0, t.banned_rows * x.shape[1] + t.banned_token_ids, -math.inf)
    return x


def filter_threshold(z: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Per-row threshold in scaled-logit space: keep z >= threshold. float32 [B].

    z: [B, V] float32, temperature-scaled logits. Top-k, then top-p over the top-k
    renormalized distribution, then min-p (p >= min_p * p_max, i.e.
    z >= z_max + log(min_p), which renormalization does not change). Off -> -inf.
    """
    if t.any_top_p:
        threshold = _top_k_top_p_threshold(z, t)
    elif t.any_top_k:
        threshold = _top_k_threshold(z, t)
    else:
        threshold = torch.full_like(z[:, 0], -math.inf)
    if t.any_min_p:
        threshold = torch.maximum(threshold, z.amax(dim=-1) + torch.log(t.min_p))
    return threshold


def _top_k_threshold(z: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Value of each row's k-th largest z (-inf where top-k is off): [B]."""
    values = z.topk(t.max_top_k, dim=-1).values  # [B, max_top_k], descending
    kth = (t.top_k.clamp(max=t.max_top_k) - 1)[:, None]  # [B, 1]
    threshold = values.gather(1, kth).squeeze(1)
    return torch.where(t.top_k < t.vocab_size, threshold, -math.inf)


def _top_k_top_p_threshold(z: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Smallest kept z after top-k then top-p (exclusive cumulative prob < p): [B]."""
    return ranked_threshold(z, t.top_k, t.top_p, t.top_p_width)


def ranked_threshold(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int) -> torch.Tensor:
    """Top-k then top-p thresholds of z [B, V] from each row's ``width`` largest values (W below): the whole
    sorted row, or, when every top-p row has a top-k of at most ``width``, a top-k selection (the same
    leading values; rows with neither filter then keep everything: -inf). top_k [B] (V when off), top_p
    [B] (1 when off). [B] float32; no host synchronization."""
    vocab = z.shape[-1]
    ranked = z.topk(width, dim=-1).values if width < vocab else sorted_descending(z)  # [B, W]
    beyond_k = torch.arange(width, device=z.device)[None, :] >= top_k[:, None]  # [B, W]
    probs = ranked.masked_fill(beyond_k, -math.inf).softmax(dim=-1)  # [B, W]
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # [B, W]
    # in place from here on (fresh [B, V] tensors cost as much as the arithmetic on the CPU)
    kept = (mass_before < top_p[:, None]).logical_or_(top_p[:, None] >= 1.0).logical_and_(beyond_k.logical_not_())
    num_kept = kept.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, 1]
    threshold = ranked.gather(1, num_kept - 1).squeeze(1)  # [B]
    if width < vocab:
        threshold = torch.where(top_k < vocab, threshold, -math.inf)
    return threshold


def sorted_descending(z: torch.Tensor) -> torch.Tensor:
    """Each row of z [B, V] sorted, largest first (values only, so any sort gives the same tensor). On the
    CPU numpy's sort: about 25x faster than torch's for one row of a 49k vocabulary (0.1 against 2.9 ms),
    which is most of the cost of top-p there."""
    if z.device.type != "cpu":
        return z.sort(dim=-1, descending=True).values
    return torch.from_numpy(np.ascontiguousarray(np.sort(z.numpy(), axis=-1)[:, ::-1]))


def gumbel_argmax_torch(x: torch.Tensor, t: SamplingTensors, threshold: torch.Tensor | None) -> torch.Tensor:
    """Reference draw: argmax(where(z >= thr, z, -inf) + noise_scale * g), z = x * inv_T. [B] int64."""
    return _gumbel_argmax_torch(x, t.inv_temperature, None if t.all_random else t.noise_scale, threshold,
                                t.noise_key_lo, t.noise_key_hi)


def _gumbel_argmax_torch(x: torch.Tensor, inv_temperature: torch.Tensor, noise_scale: torch.Tensor | None,
                         threshold: torch.Tensor | None, key_lo: torch.Tensor, key_hi: torch.Tensor) -> torch.Tensor:
    """``gumbel_argmax_torch`` on raw [B] tensors (noise_scale None: every row draws)."""
    z = x.float() * inv_temperature[:, None]  # [B, V]
    if threshold is not None:
        z = torch.where(z >= threshold[:, None], z, -math.inf)
    g = gumbel_noise_torch(key_lo, key_hi, x.shape[-1])  # [B, V], ours: updated in place
    if noise_scale is not None:
        g.mul_(noise_scale[:, None])
    return g.add_(z).argmax(dim=-1)  # z + g: the sum is commutative, bit for bit


# --------------------------------------------------------------------------- the draw inside the decode graphs


@dataclass(frozen=True)
class GraphDraw:
    """A batch the decode graphs can sample by themselves (``allmos.engine.cuda_graphs``): rows that need no
    penalties, banned ids or logprobs, and whose filters a fixed-width ranking covers (every top-k at most
    ``GRAPH_TOP_K``, top-p only beside a top-k; min-p any). It samples from fixed [B] columns; its tokens are
    the ones ``Sampler`` picks for the same rows. ``filtered``: some row's top-k, top-p or min-p is on (the
    graphs run their filtered draw; else the plain one: a temperature and the random draw).

    ``of(rows)`` returns None for any other batch. Built once per set of rows; ``columns`` per step.
    """

    inv_temperature: np.ndarray  # [B] float32, 1 for greedy rows
    noise_scale: np.ndarray  # [B] float32, 0 for greedy rows
    top_k: np.ndarray  # [B] int32, the vocabulary size when off
    top_p: np.ndarray  # [B] float32, 1 when off
    min_p: np.ndarray  # [B] float32, 0 when off
    seeds: np.ndarray  # [B] uint64
    filtered: bool

    @classmethod
    def of(cls, rows: Sequence[SamplingRow], vocab_size: int) -> GraphDraw | None:
        if any(r.num_logprobs is not None or r.banned_token_ids or r.has_output_penalty or r.has_repetition_penalty
               for r in rows):
            return None
        table = _row_table(list(rows))
        active_top_k, active_top_p, active_min_p = _active_filters(table, vocab_size)
        if (table[active_top_k, 6] > GRAPH_TOP_K).any() or (active_top_p & ~active_top_k).any():
            return None
        inv_t, noise, top_p, min_p = _float_columns(table)[:4]
        seeds = np.fromiter((r.seed for r in rows), dtype=np.uint64, count=len(rows))
        filtered = bool(active_top_k.any() or active_top_p.any() or active_min_p.any())
        return cls(inv_t, noise, _top_k_column(table, vocab_size).astype(np.int32), top_p, min_p, seeds, filtered)

    def columns(self, positions: Sequence[int]) -> list[np.ndarray]:
        """7 x int32 [B]: the noise keys' low and high halves at ``positions`` (the sampled tokens' indices),
        the bits of inv_temperature and noise_scale (float32 viewed as int32), top_k, and the bits of top_p
        and min_p."""
        keys = noise_keys_np(self.seeds, np.asarray(positions, dtype=np.uint64))
        lo, hi = (half.astype(np.int32) for half in _key_halves(keys))
        return [lo, hi, self.inv_temperature.view(np.int32), self.noise_scale.view(np.int32), self.top_k,
                self.top_p.view(np.int32), self.min_p.view(np.int32)]


def graph_draw(x: torch.Tensor, inv_temperature: torch.Tensor, noise_scale: torch.Tensor, key_lo: torch.Tensor,
               key_hi: torch.Tensor, out: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The draw of a ``GraphDraw`` batch from its device columns into ``out``: x [B, V] logits, the rest [B]
    (``threshold``: ``graph_threshold``'s, None when no filter is on); out [B] int64. The Triton kernels on
    CUDA (when installed; chunks of ``_SMALL_BATCH_DRAW_CHUNK`` logits up to ``_SMALL_BATCH_ROWS`` rows, so a
    small batch still spreads over the GPU), else the torch reference; no host synchronization, so it can be
    captured in a CUDA graph."""
    if _HAS_TRITON and x.is_cuda:
        chunk = _SMALL_BATCH_DRAW_CHUNK if x.shape[0] <= _SMALL_BATCH_ROWS else _DRAW_CHUNK
        return triton_gumbel_argmax(x, inv_temperature, noise_scale, threshold, key_lo, key_hi, all_random=False,
                                    chunk_size=chunk, out=out)
    return out.copy_(_gumbel_argmax_torch(x, inv_temperature, noise_scale, threshold, key_lo, key_hi))


def graph_threshold(x: torch.Tensor, inv_temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor) -> torch.Tensor:
    """``filter_threshold`` of a filtered ``GraphDraw`` batch from its columns (x [B, V] logits, the rest
    [B]; top_k int32): the same values the ``Sampler`` computes for those rows, from a ranking of fixed
    width (``GRAPH_TOP_K``, as ``SamplingTensors.top_p_width`` gives such a batch). [B] float32."""
    z = x.float() * inv_temperature[:, None]  # [B, V]
    threshold = ranked_threshold(z, top_k.long(), top_p, min(GRAPH_TOP_K, z.shape[-1]))
    return torch.maximum(threshold, z.amax(dim=-1) + torch.log(min_p))


def raw_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, max_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The given token's logprob then the top-`max_k` of log_softmax(raw logits, float32), and the given
    token's 1-based rank (count of strictly greater logprobs + 1). Used for sampled tokens and, with the
    next prompt token as `token_ids`, for prompt positions.

    logits: [B, V]; token_ids: [B] int64. Returns (logprobs float32 [B, 1 + max_k], token ids int64
    [B, 1 + max_k], ranks int64 [B]).
    """
    lp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = token_ids[:, None]  # [B, 1]
    chosen_lp = lp.gather(1, chosen)  # [B, 1]
    ranks = (lp > chosen_lp).sum(dim=-1) + 1  # [B]
    if max_k == 0:
        return chosen_lp, chosen, ranks
    top = lp.topk(max_k, dim=-1)  # sorted descending
    return torch.cat([chosen_lp, top.values], 1), torch.cat([chosen, top.indices], 1), ranks


# --------------------------------------------------------------------------- module


class Sampler(torch.nn.Module):
    """Samples one token per row; see the module docstring for the exact semantics.

    use_triton: None picks the fused Triton draw for CUDA logits when Triton is
    installed; True forces it (also on CPU tensors under TRITON_INTERPRET=1); False
    always uses the torch reference.
    """

    def __init__(self, use_triton: bool | None = None) -> None:
        super().__init__()
        self.use_triton = use_triton

    def forward(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        """logits: [B, V] any float dtype (not modified). Returns tokens [B] and logprobs."""
        if logits.dim() != 2 or logits.shape[0] != t.batch_size or logits.shape[1] != t.vocab_size:
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match the sampling batch "
                             f"[{t.batch_size}, {t.vocab_size}]")
        x = self._processed_logits(logits, t)  # [B, V]
        token_ids = x.argmax(dim=-1) if t.all_greedy else self._draw(x, t)  # [B]
        if t.max_num_logprobs is None:
            return SamplerOutput(token_ids, None, None)
        logprobs, logprob_ids, ranks = raw_logprobs(logits, token_ids, t.max_num_logprobs)
        return SamplerOutput(token_ids, logprobs, logprob_ids, ranks)

    def _processed_logits(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """Penalties and banned ids applied; the input itself when neither is active."""
        if t.any_penalty:
            x = apply_penalties(logits, t)
        elif t.any_banned:
            x = logits.to(torch.float32, copy=True)
        else:
            return logits
        return apply_banned(x, t) if t.any_banned else x

    def _draw(self, x: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """Temperature, filters and the counter-based random draw (greedy rows: noise 0)."""
        threshold = None
        if t.any_filter:
            threshold = filter_threshold(x.float() * t.inv_temperature[:, None], t)
        use_triton = self.use_triton
        if use_triton is None:
            use_triton = _HAS_TRITON and x.is_cuda
        if use_triton:
            return gumbel_argmax_triton(x, t, threshold)
        return gumbel_argmax_torch(x, t, threshold)


# --------------------------------------------------------------------------- triton


def gumbel_argmax_triton(
    x: torch.Tensor, t: SamplingTensors, threshold: torch.Tensor | None,
    chunk_size: int = _DRAW_CHUNK, block_size: int = _DRAW_BLOCK,
) -> torch.Tensor:
    """The fused Triton draw (``allmos.kernels.sampling``) on ``t``'s tensors: the same tokens as
    `gumbel_argmax_torch`, [B] int64."""
    if not _HAS_TRITON:
        raise RuntimeError("Sampler(use_triton=True) needs the triton package")
    return triton_gumbel_argmax(x, t.inv_temperature, t.noise_scale, threshold, t.noise_key_lo, t.noise_key_hi,
                                all_random=t.all_random, chunk_size=chunk_size, block_size=block_size)
