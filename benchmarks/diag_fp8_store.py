"""Where the fp8 store kernel and ``store_kv_cache_ref`` disagree on a CUDA device (bit for bit).

Usage: ``PYTHONPATH=. python benchmarks/diag_fp8_store.py``. Prints how many stored bytes differ and, for the
first few, the input, the center, the scale, ``(x - center) / scale`` in float32 and both stored codes.
"""

from __future__ import annotations

import torch

from allmos.attention.torch_ref import FP8_KV_DTYPE, KVScales, store_kv_cache_ref
from allmos.kernels.store_kv import store_kv_cache


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (3000, 8, 128)
    key, value = [(torch.randn(shape, generator=gen) * torch.exp(torch.empty(shape).uniform_(-9, 7, generator=gen)))
                  .to("cuda", torch.bfloat16) for _ in range(2)]
    slots = torch.randperm(16 * 256, generator=gen)[:3000].cuda()
    center = (torch.randn(8, 128, generator=torch.Generator().manual_seed(1)) * 3).cuda()
    one = {"dtype": torch.float32, "device": "cuda"}
    scales = KVScales(torch.tensor([0.37], **one), torch.tensor([1.9], **one), center)
    caches = [torch.zeros(16, 256, 8, 128, device="cuda").to(FP8_KV_DTYPE) for _ in range(4)]
    store_kv_cache(key, value, caches[0], caches[1], slots, scales)
    store_kv_cache_ref(key, value, caches[2], caches[3], slots, scales)
    for name, got, ref, x, c, s in (("K", caches[0], caches[2], key, center, 0.37),
                                    ("V", caches[1], caches[3], value, torch.zeros_like(center), 1.9)):
        g, r = got.view(torch.uint8)[slots // 256, slots % 256], ref.view(torch.uint8)[slots // 256, slots % 256]
        bad = (g != r).nonzero()
        print(f"{name}: {len(bad)} of {g.numel()} codes differ")
        for t, h, d in bad[:12].tolist():
            xv = x[t, h, d].float().item()
            y = (x[t, h, d].float() - c[h, d]) / s
            block, offset = divmod(int(slots[t]), 256)
            print(f"  x={xv!r} center={c[h, d].item()!r} y={y.item()!r} "
                  f"kernel=0x{g[t, h, d].item():02x} ({got[block, offset, h, d].float().item()}) "
                  f"ref=0x{r[t, h, d].item():02x} ({ref[block, offset, h, d].float().item()})")


if __name__ == "__main__":
    main()
