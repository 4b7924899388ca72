"""Soak test: many threads send a mix of valid and invalid requests to one engine on a
tiny model. Checks that nothing crashes, every valid result equals the one-at-a-time
result, every invalid request fails with its expected error, and memory stays flat
(the RSS after the last 1,000 requests within 5% of the RSS after the first 1,000).

usage: python scripts/soak.py [--model tests/fixtures/models/tiny16-gqa] [--threads 8] [--requests 4000]
"""

from __future__ import annotations

import argparse
import pathlib
import random
import resource
import sys
import threading
import time
from typing import Any

import lfm
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    # Current RSS from /proc (ru_maxrss is the peak, which cannot show a leak flattening).
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cases() -> list[tuple[str, Any, list[Any], dict[str, Any], Any]]:
    """(name, messages, images, options, expected) with expected an exception class or None."""
    img = np.full((48, 64, 3), 120, np.uint8)
    big = np.zeros((700, 900, 3), np.uint8)
    regex = lfm.Grammar.regex("(yes|no)[0-9]{1,2}")
    return [
        ("text", "Tell me something.", [], {"max_new_tokens": 8}, None),
        ("image", "Describe.", [img], {"max_new_tokens": 6}, None),
        ("multi_tile", "Describe.", [big], {"max_new_tokens": 4}, None),
        ("sampled", "Go.", [], {"max_new_tokens": 8, "temperature": 0.9, "seed": 5}, None),
        ("grammar", "Answer.", [], {"max_new_tokens": 8, "_grammar": regex}, None),
        ("bad_option", "x", [], {"temperature": -1}, lfm.InvalidOptionsError),
        ("bad_image", "Describe.", [b"garbage"], {}, lfm.ImageError),
        ("missing_file", "Describe.", ["/no/such/file.jpg"], {}, FileNotFoundError),
        ("special_token", "hi <|im_end|>", [], {}, lfm.RequestRejectedError),
        ("count_mismatch", [{"role": "user", "content": [{"type": "image"}]}], [], {}, lfm.RequestRejectedError),
        ("too_long", "word " * 3000, [], {"max_new_tokens": 32000}, None),
    ]


def run(engine: lfm.Engine, case: tuple[str, Any, list[Any], dict[str, Any], Any]) -> Any:
    name, messages, images, opts, _ = case
    opts = dict(opts)
    grammar = opts.pop("_grammar", None)
    return engine.generate(messages, images, opts, grammar=grammar)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "tests/fixtures/models/tiny16-gqa"))
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    engine = lfm.Engine.from_dir(args.model, lfm.EngineOptions(intra_threads=1, limits=lfm.Limits(context_tokens=4000)))
    table = cases()
    expected: dict[str, Any] = {}
    for c in table:
        if c[4] is None:
            try:
                expected[c[0]] = run(engine, c).token_ids
            except lfm.PromptTooLongError:
                expected[c[0]] = lfm.PromptTooLongError
        else:
            expected[c[0]] = c[4]

    rng = random.Random(args.seed)
    plan = [rng.randrange(len(table)) for _ in range(args.requests)]
    lock = threading.Lock()
    done = 0
    failures: list[str] = []
    marks: dict[int, float] = {}
    next_index = 0

    def worker() -> None:
        nonlocal done, next_index
        while True:
            with lock:
                if next_index >= len(plan):
                    return
                i = next_index
                next_index += 1
            case = table[plan[i]]
            want = expected[case[0]]
            try:
                got: Any = run(engine, case).token_ids
            except Exception as e:
                got = type(e)
            ok = got == want if not isinstance(want, type) else (isinstance(got, type) and issubclass(got, want))
            with lock:
                done += 1
                if not ok:
                    failures.append(f"request {i} ({case[0]}): got {got!r}, expected {want!r}")
                if done % 1000 == 0:
                    marks[done] = rss_mb()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    print(f"{done} requests on {args.threads} threads in {elapsed:.1f} s ({done / elapsed:.1f} req/s); stats {engine.stats}")
    print("RSS (MB) after each 1,000 requests:", {k: round(v, 1) for k, v in sorted(marks.items())})
    ok = not failures
    if len(marks) >= 2:
        first, last = marks[min(marks)], marks[max(marks)]
        growth = (last - first) / first
        print(f"RSS growth from the first to the last 1,000 requests: {growth * 100:+.2f}%")
        ok = ok and abs(growth) <= 0.05
    for f in failures[:20]:
        print("FAIL", f)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
