"""Images/s of concurrent captioning for several EngineOptions.max_batch_size values.

    /work/venvs/dev/bin/python benches/bench_batch_size.py [MODEL_DIR] [--sizes 8,12]
        [--images 24] [--size 300x400] [--new-tokens 64] [--rounds 2]

MODEL_DIR defaults to bench-models/real (scripts/make_bench_model.py). One engine per batch size
(2 intra-op threads each, loaded side by side); ``--images`` photo-like arrays of ``--size``
(the same as bench_throughput.py's) are captioned by one thread each, all at once, greedy,
exactly ``--new-tokens`` new tokens, so the scheduler batches up to max_batch_size decoder
rows. Rounds alternate between the engines (a, b, a, b, ...) after one warm-up request each;
the figure is images/s per round. Small images keep prefill short, so decoding dominates and
the per-step cost of a larger batch shows. The table gives the cores other processes used
during each round (shared machines; nothing is redone). Writes a markdown table to stdout and to --out
(default benches/results/batch_size.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

import lfm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _machine import cpu_name, cpu_reading, foreign_cores  # noqa: E402
from bench_throughput import PROMPT, make_image  # noqa: E402

ROOT = os.path.dirname(HERE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=os.path.join(ROOT, "bench-models", "real"))
    ap.add_argument("--sizes", default="8,12", help="max_batch_size values, comma-separated")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", default="300x400", help="image width x height")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "batch_size.md"))
    args = ap.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    width, height = (int(v) for v in args.size.split("x"))
    images = [make_image(width, height, seed) for seed in range(args.images)]
    request = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    engines = {
        b: lfm.Engine.from_dir(args.model_dir, lfm.EngineOptions(intra_threads=2, max_batch_size=b), strict=False)
        for b in sizes
    }
    for engine in engines.values():
        engine.generate(PROMPT, [images[0]], {"max_new_tokens": 4})

    rates: dict[int, list[float]] = {b: [] for b in sizes}
    foreign: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(args.rounds):
        for b, engine in engines.items():
            before, start = cpu_reading(), time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
                list(pool.map(lambda image, e=engine: e.generate(PROMPT, [image], request), images))
            wall = time.perf_counter() - start
            rates[b].append(len(images) / wall)
            foreign[b].append(foreign_cores(before, cpu_reading(), wall))

    base = sizes[0]
    lines = [
        "# Concurrent captioning by max_batch_size",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; 2 intra-op threads per engine",
        f"- job: {args.images} images of {width}x{height}, all submitted at once, greedy, "
        f"exactly {args.new_tokens} new tokens, {args.rounds} alternating rounds",
        f"- reproduce: `/work/venvs/dev/bin/python benches/bench_batch_size.py --sizes {args.sizes} "
        f"--images {args.images} --size {args.size} --new-tokens {args.new_tokens} --rounds {args.rounds}`",
        "",
        f"| max_batch_size | images/s per round | vs {base} (mean) | other processes, cores per round |",
        "|---|---|---|---|",
    ]
    mean = {b: sum(r) / len(r) for b, r in rates.items()}
    for b in sizes:
        per_round = ", ".join(f"{r:.3f}" for r in rates[b])
        others = ", ".join(f"{c:.2f}" for c in foreign[b])
        lines.append(f"| {b} | {per_round} | {mean[b] / mean[base]:.2f}x | {others} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
