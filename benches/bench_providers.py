"""CPU vs a GPU execution provider, same engine and requests, on text prompts.

    python benches/bench_providers.py [MODEL_DIR] [--provider cuda]

MODEL_DIR: a real-size model from scripts/make_bench_model.py (default bench-models/real).
Needs onnxruntime-gpu in place of onnxruntime (or ORT_DYLIB_PATH pointing at its library).
For each provider: prefill time and batch-1 decode rate after a short (~360-token) and a
long (~3,100-token) prompt, then 16 prompts of different lengths generated batched; 64
forced new tokens, greedy. Prints one line per provider and how many generations had
identical token ids on both. Text only: benches/results/cuda.md says why.
"""

from __future__ import annotations

import argparse
import os
import time

import lfm

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars shine above".split()


def prompt(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=os.path.join(HERE, "..", "bench-models", "real"))
    ap.add_argument("--provider", default="cuda")
    args = ap.parse_args()
    opts = lfm.RequestOptions(max_new_tokens=64, min_new_tokens=64, repetition_penalty=1.0)
    ids: dict[str, list[tuple[int, ...]]] = {}
    for prov in ["cpu", args.provider]:
        e = lfm.Engine.from_dir(args.model_dir, strict=False, options=lfm.EngineOptions(providers=(prov,)))
        e.generate("hi", options=lfm.RequestOptions(max_new_tokens=4))
        row: dict[str, object] = {}
        got: list[tuple[int, ...]] = []
        for n in (200, 1800):
            g = e.generate(prompt(1, n), options=opts)
            got.append(g.token_ids)
            row[f"prompt{g.usage.prompt_tokens}_prefill_s"] = round(g.timings.prefill_s, 3)
            row[f"prompt{g.usage.prompt_tokens}_decode_tok_s"] = round(64 / g.timings.decode_s, 1)
        t = time.perf_counter()
        batch = e.generate_batch([prompt(i, 200 + 37 * i) for i in range(16)], options=opts)
        dt = time.perf_counter() - t
        row["batch16_requests_per_s"] = round(16 / dt, 3)
        row["batch16_new_tok_per_s"] = round(16 * 64 / dt, 1)
        row["stats"] = e.stats
        ids[prov] = got + [g.token_ids for g in batch if isinstance(g, lfm.Generation)]
        print(prov, row, flush=True)
    a, b = ids["cpu"], ids[args.provider]
    print(f"same ids cpu vs {args.provider}:", sum(x == y for x, y in zip(a, b)), "of", len(a))


if __name__ == "__main__":
    main()
