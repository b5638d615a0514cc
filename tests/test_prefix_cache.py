"""Prefix caching shares a KV block only when the whole prefix up to and including it is the same.

A block's KV depends on every earlier token (and on its position), so two blocks with the same tokens under
different prefixes must never share KV. The engine's greedy outputs are checked against transformers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hf_reference import hf_greedy

from allmos import LLM, SamplingParams
from allmos.memory.block_manager import BlockManager

BLOCK = 16
MAX_NEW = 8


def block(rng: random.Random) -> list[int]:
    return [rng.randrange(3, 512) for _ in range(BLOCK)]


def test_same_block_under_another_prefix_is_not_shared(qwen3_dir):
    rng = random.Random(7)
    x, y, c, d = (block(rng) for _ in range(4))
    tail = [rng.randrange(3, 512) for _ in range(5)]
    first = x + c + d + tail  # caches blocks [x], [x c], [x c d]
    others = {
        "moved": c + d + tail,  # c and d at other positions, after another prefix
        "other_first_block": y + c + d + tail,  # c and d at the same positions, after another first block
        "same_prefix": x + c + d + tail[:3],  # shares all three blocks (the cache does work)
    }
    llm = LLM(str(qwen3_dir), kvcache_block_size=BLOCK, num_kvcache_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    llm.generate([first], params, use_tqdm=False)
    outs = llm.generate(list(others.values()), params, use_tqdm=False)
    cached = {name: out.num_cached_tokens for name, out in zip(others, outs)}
    assert cached == {"moved": 0, "other_first_block": 0, "same_prefix": 3 * BLOCK}
    assert [o.token_ids for o in outs] == hf_greedy(qwen3_dir, list(others.values()), MAX_NEW)
    llm.engine.block_manager.check_integrity()


@dataclass
class _Seq:
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_published_blocks: int = 0


def test_block_hash_chains_the_parent():
    rng = random.Random(8)
    x, y, c = block(rng), block(rng), block(rng)
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    a, b = _Seq(x + c), _Seq(y + c)
    bm.update_block_hashes(a)
    bm.update_block_hashes(b)
    assert a.block_hashes[1] != b.block_hashes[1]  # same tokens, different parent
    bm.allocate(a, len(a.token_ids))
    a.num_computed_tokens = len(a.token_ids)
    bm.cache_full_blocks(a)
    assert bm.find_cached_prefix(_Seq(c + c + [5])) == []  # c first: no block of a may match
    assert bm.find_cached_prefix(_Seq(x + c + [5])) == a.block_table[:2]
