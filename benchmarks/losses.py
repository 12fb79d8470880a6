"""Cost of the VRPO objective itself (no model): vrpo_loss vs preference_loss, forward +
backward, side by side in one run. The loss is never the bottleneck of training (the
extra K sequences' forward passes are); this shows it.

    .venv/bin/python benchmarks/losses.py
"""
import time

import torch

from vrpo.losses import preference_loss, vrpo_loss


def timeit(fn, reps=50):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(B=4096):
    torch.manual_seed(0)
    rc, rr = torch.randn(B, requires_grad=True), torch.randn(B, requires_grad=True)
    aux = torch.rand(B)
    base_t = timeit(lambda: preference_loss(rc, rr).mean().backward())
    print(f"batch {B}: preference_loss fwd+bwd {base_t * 1e3:.3f} ms")
    for K in (2, 4, 8, 16):
        ref = torch.randn(B, K, requires_grad=True)
        rg = torch.rand(B, K, K)
        t = timeit(lambda: vrpo_loss(rc, rr, aux, ref, rg).mean().backward())
        print(f"  vrpo_loss K={K:2d} ({K * (K - 1) // 2:3d} pairs): {t * 1e3:.3f} ms  ratio {t / base_t:.1f}x")


if __name__ == "__main__":
    main()
