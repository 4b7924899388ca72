#!/usr/bin/env python3
"""Golden file for lfm's logits processing (rust/lfm-core/src/sampling.rs::Sampler::process).

Writes tests/fixtures/golden/sampling.json: ~40 cases, each a float32 logits row over a small
vocabulary, the ids transformers would see (`input_ids` = prompt + generated), and the scores
after transformers' own logits processors, built the way `generate()` builds them
(`GenerationMixin._get_logits_processor`, transformers 5.x):

    RepetitionPenaltyLogitsProcessor      if repetition_penalty != 1.0
    MinNewTokensLengthLogitsProcessor     if min_new_tokens > 0 (EOS known)
    -- only when do_sample (temperature > 0), min_tokens_to_keep = 1 --
    TemperatureLogitsWarper               if temperature != 1.0
    TopKLogitsWarper                      if top_k != 0
    TopPLogitsWarper                      if top_p < 1.0
    MinPLogitsWarper                      if min_p is not None (lfm: min_p == 0 means off)

Every case is computed twice: with that hand-built list, and with the real
`GenerationMixin._get_logits_processor` called on a stub model and a GenerationConfig; the
script fails unless both give bit-identical scores and the same processor classes.

JSON encoding: floats are the exact float32 values written as shortest round-trip decimals
(parse as f64, then cast to f32, to get the bits back); -inf is the string "-inf".

Run from the repository root: /work/venvs/ref/bin/python scripts/make_sampling_goldens.py
Deterministic (numpy seed 20250611); two runs give byte-identical output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import types
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerationMixin

EOS = 7
SEED = 20250611
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/golden/sampling.json"


def build_manual(o: dict, prompt_len: int) -> LogitsProcessorList:
    """The processors generate() builds, in _get_logits_processor's order and conditions."""
    procs = LogitsProcessorList()
    if o["repetition_penalty"] != 1.0:
        # generate() passes prompt_ignore_length = leading padding count (0 without padding).
        procs.append(RepetitionPenaltyLogitsProcessor(float(o["repetition_penalty"])))
    if o["min_new_tokens"] > 0:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, o["min_new_tokens"], EOS))
    if o["temperature"] > 0:  # do_sample
        if o["temperature"] != 1.0:
            procs.append(TemperatureLogitsWarper(float(o["temperature"])))
        if o["top_k"] != 0:
            procs.append(TopKLogitsWarper(top_k=o["top_k"], min_tokens_to_keep=1))
        if o["top_p"] < 1.0:
            procs.append(TopPLogitsWarper(top_p=o["top_p"], min_tokens_to_keep=1))
        if o["min_p"] is not None:
            procs.append(MinPLogitsWarper(min_p=o["min_p"], min_tokens_to_keep=1))
    return procs


def build_via_generate(o: dict, prompt_len: int, input_ids: torch.Tensor) -> LogitsProcessorList:
    """transformers' own _get_logits_processor on a stub decoder-only model."""
    sample = o["temperature"] > 0
    gc = GenerationConfig(
        do_sample=sample,
        temperature=float(o["temperature"]) if sample else None,
        top_k=o["top_k"] if sample else None,
        top_p=o["top_p"] if sample else None,
        min_p=o["min_p"] if sample else None,
        repetition_penalty=float(o["repetition_penalty"]),
        min_new_tokens=o["min_new_tokens"],
        eos_token_id=EOS,
    )
    gc._eos_token_tensor = torch.tensor([EOS])
    stub = types.SimpleNamespace(
        config=types.SimpleNamespace(is_encoder_decoder=False),
        _merge_criteria_processor_list=lambda default, custom: default,
    )
    mask = torch.ones((1, prompt_len), dtype=torch.long)
    return GenerationMixin._get_logits_processor(
        stub,
        generation_config=gc,
        input_ids_seq_length=prompt_len,
        device="cpu",
        model_kwargs={"attention_mask": mask},
    )


@contextlib.contextmanager
def stable_sort():
    """torch.sort with stable=True (ties in index order), as TopPLogitsWarper calls it."""
    orig = torch.sort

    def sort(*a, **k):
        k["stable"] = True
        return orig(*a, **k)

    torch.sort = sort
    try:
        yield
    finally:
        torch.sort = orig


def enc(x: float):
    if math.isinf(x) and x < 0:
        return "-inf"
    assert math.isfinite(x), x
    return float(x)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isneginf(a), torch.isneginf(b))) and bool(
        torch.equal(torch.nan_to_num(a, neginf=0.0), torch.nan_to_num(b, neginf=0.0))
    )


def make_cases(rng: np.random.Generator) -> list[dict]:
    grid = []

    def opt(t=0.0, k=0, p=1.0, mp=None, rp=1.0, mnt=0):
        return {"temperature": t, "top_k": k, "top_p": p, "min_p": mp, "repetition_penalty": rp,
                "min_new_tokens": mnt}

    # (name, options, generated count, row kind)
    # Greedy: only the repetition penalty and min_new_tokens act.
    grid += [
        ("greedy_rp1.0", opt(rp=1.0), 3, "normal"),
        ("greedy_rp1.05", opt(rp=1.05), 3, "normal"),
        ("greedy_rp1.5", opt(rp=1.5), 4, "normal"),
        ("greedy_rp0.8", opt(rp=0.8), 2, "normal"),
        ("greedy_rp1.05_mnt_active", opt(rp=1.05, mnt=3), 1, "eos_high"),
        ("greedy_rp1.05_mnt_boundary_inactive", opt(rp=1.05, mnt=3), 3, "eos_high"),
        ("greedy_rp1.5_mnt_active_no_generated", opt(rp=1.5, mnt=2), 0, "eos_high"),
        ("greedy_rp1.0_mnt_inactive", opt(rp=1.0, mnt=5), 6, "eos_high"),
        ("greedy_rp1.3_penalised_neginf", opt(rp=1.3), 5, "neginf"),
        ("greedy_rp0.8_mnt_active_ties", opt(rp=0.8, mnt=4), 2, "ties"),
        ("greedy_rp1.05_warpers_ignored", opt(t=0.0, k=5, p=0.3, mp=0.3, rp=1.05), 2, "normal"),
    ]
    # Each warper alone.
    grid += [
        ("temp0.5", opt(t=0.5), 2, "normal"),
        ("temp1.0_nothing", opt(t=1.0), 2, "normal"),
        ("temp1.7", opt(t=1.7), 2, "neginf"),
        ("topk1", opt(t=1.0, k=1), 2, "normal"),
        ("topk5", opt(t=1.0, k=5), 2, "normal"),
        ("topk20", opt(t=1.0, k=20), 2, "neginf"),
        ("topk5_ties_at_kth", opt(t=1.0, k=5), 2, "ties_topk"),
        ("topp0.3", opt(t=1.0, p=0.3), 2, "normal"),
        ("topp0.9", opt(t=1.0, p=0.9), 2, "normal"),
        ("topp1.0_off", opt(t=1.0, p=1.0), 2, "normal"),
        ("topp0.9_neginf", opt(t=1.0, p=0.9), 2, "neginf"),
        ("minp0.05", opt(t=1.0, mp=0.05), 2, "normal"),
        ("minp0.3", opt(t=1.0, mp=0.3), 2, "normal"),
        ("minp0.0_explicit", opt(t=1.0, mp=0.0), 2, "normal"),
        ("minp0.3_peaked", opt(t=1.0, mp=0.3), 2, "peaked"),
    ]
    # Combinations.
    grid += [
        ("t0.5_k20_p0.9_mp0.05_rp1.05", opt(t=0.5, k=20, p=0.9, mp=0.05, rp=1.05), 3, "normal"),
        ("t1.7_k5_p0.3", opt(t=1.7, k=5, p=0.3), 2, "normal"),
        ("t1.7_p0.9_mp0.3", opt(t=1.7, p=0.9, mp=0.3), 2, "neginf"),
        ("t0.5_k1_rp1.5", opt(t=0.5, k=1, rp=1.5), 4, "normal"),
        ("t1.0_k20_mp0.3_mnt_active", opt(t=1.0, k=20, mp=0.3, mnt=4), 2, "eos_high"),
        ("model_card_t0.1_mp0.15_rp1.05", opt(t=0.1, mp=0.15, rp=1.05), 3, "normal"),
        ("t1.7_k5_p0.9_mp0.05_rp0.8_mnt", opt(t=1.7, k=5, p=0.9, mp=0.05, rp=0.8, mnt=3), 1, "eos_high"),
        ("t1.0_k20_p0.9_ties", opt(t=1.0, k=20, p=0.9, rp=1.05), 2, "ties"),
        ("t0.5_p0.3_mp0.05_large_logits", opt(t=0.5, p=0.3, mp=0.05, rp=1.5), 3, "large"),
        ("t1.7_k20_p0.9_mp0.3_rp1.05_mnt_inactive", opt(t=1.7, k=20, p=0.9, mp=0.3, rp=1.05, mnt=2), 2, "eos_high"),
    ]
    # Flatter rows (N(0, 1)) so that the warpers keep many tokens, and an all-equal row
    # (top-p then depends on how tied logits sort: torch.sort's default, unstable, order is
    # implementation-defined; see `stable_sort` below).
    grid += [
        ("topp0.9_flat", opt(t=1.0, p=0.9), 2, "flat"),
        ("minp0.05_flat", opt(t=1.0, mp=0.05), 2, "flat"),
        ("t1.7_k20_p0.9_mp0.05_rp1.05_flat", opt(t=1.7, k=20, p=0.9, mp=0.05, rp=1.05), 3, "flat"),
        ("t0.5_k5_p0.9_flat", opt(t=0.5, k=5, p=0.9), 2, "flat"),
        ("topp0.3_uniform", opt(t=1.0, p=0.3), 0, "uniform"),
    ]
    # A few random draws from the option grid.
    for i in range(8):
        o = opt(
            t=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
            k=int(rng.choice([0, 1, 5, 20])),
            p=float(rng.choice([0.3, 0.9, 1.0])),
            mp=[None, 0.05, 0.3][int(rng.integers(3))],
            rp=float(rng.choice([1.0, 1.05, 1.5, 0.8])),
            mnt=int(rng.choice([0, 0, 2, 5])),
        )
        grid.append((f"random_{i}", o, int(rng.integers(0, 5)),
                     str(rng.choice(["normal", "neginf", "ties", "eos_high"]))))

    cases = []
    for name, o, generated, kind in grid:
        v = int(rng.integers(48, 65))
        row = rng.normal(0.0, 1.0 if kind == "flat" else 3.0, size=v).astype(np.float32)
        if kind == "uniform":
            row[:] = np.float32(0.5)
        if kind == "neginf":
            row[rng.choice(np.arange(8, v), size=4, replace=False)] = -np.inf
        elif kind == "ties":
            a, b = rng.choice(np.arange(8, v), size=2, replace=False)
            row[a] = row[b] = np.float32(np.max(row) - 0.25)
            c, d, e = rng.choice([i for i in range(v) if i not in (a, b)], size=3, replace=False)
            row[c] = row[d] = row[e] = np.float32(0.0)  # 0 is the penalty's sign boundary
        elif kind == "ties_topk":
            order = np.argsort(-row, kind="stable")
            row[order[4]] = row[order[5]] = row[order[6]] = row[order[4]]
        elif kind == "eos_high":
            row[EOS] = np.float32(np.max(row) + 1.0)
        elif kind == "peaked":
            row[int(rng.integers(v))] = np.float32(12.0)
        elif kind == "large":
            row *= np.float32(10.0)
        # Prompt and generated ids: repeats, EOS in the prompt, ids on -inf logits (if any).
        prompt_len = int(rng.integers(3, 9))
        pool = np.arange(v)
        prompt = list(rng.choice(pool, size=prompt_len))
        prompt[int(rng.integers(prompt_len))] = EOS
        prompt[-1] = prompt[0]  # a repeat
        gen = list(rng.choice(pool, size=generated)) if generated else []
        if generated >= 2:
            gen[-1] = gen[0]
        if kind == "neginf":
            prompt[1] = int(np.flatnonzero(np.isneginf(row))[0])
        if kind == "ties" and generated:
            gen[0] = int(c)  # penalise a zero
        input_ids = [int(x) for x in prompt + gen]
        cases.append({"name": name, "o": o, "logits": row, "input_ids": input_ids, "prompt_len": prompt_len})
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(SEED)
    out_cases = []
    for c in make_cases(rng):
        o, prompt_len = c["o"], c["prompt_len"]
        ids = torch.tensor([c["input_ids"]], dtype=torch.long)
        scores = torch.from_numpy(c["logits"].copy()).unsqueeze(0)
        manual = build_manual(o, prompt_len)
        real = build_via_generate(o, prompt_len, ids)
        names = [type(p).__name__ for p in manual]
        assert names == [type(p).__name__ for p in real], (c["name"], names, [type(p).__name__ for p in real])
        expected = manual(ids, scores.clone())
        again = real(ids, scores.clone())
        assert same(expected, again), c["name"]
        assert not torch.isnan(expected).any() and torch.isfinite(expected).any(), c["name"]
        with stable_sort():
            stable = manual(ids, scores.clone())
        options = dict(o)
        options["min_p"] = 0.0 if o["min_p"] is None else o["min_p"]
        out_cases.append({
            "name": c["name"],
            "eos": EOS,
            "prompt_len": prompt_len,
            "input_ids": c["input_ids"],
            "options": options,
            "do_sample": o["temperature"] > 0,
            "processors": names,
            "logits": [enc(float(x)) for x in c["logits"]],
            "expected": [enc(float(x)) for x in expected[0].tolist()],
        })
        if not same(expected, stable):
            # Tied logits straddle the top-p cut: which of them survive depends on torch.sort's
            # tie order. Record the stable-sort result too (same count of survivors).
            assert int(torch.isneginf(expected).sum()) == int(torch.isneginf(stable).sum()), c["name"]
            out_cases[-1]["tie_order_dependent"] = True
            out_cases[-1]["expected_stable_sort"] = [enc(float(x)) for x in stable[0].tolist()]
    doc = {
        "script": "scripts/make_sampling_goldens.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": SEED,
        "encoding": "float32 values as shortest round-trip decimals; -inf as the string \"-inf\"",
        "semantics": "expected = transformers' processors applied to (input_ids, logits) as generate() "
                     "builds them (_get_logits_processor order; do_sample = temperature > 0; "
                     "min_tokens_to_keep = 1; MinNewTokens with prompt_length_to_skip = prompt_len); "
                     "options.min_p == 0 means no MinPLogitsWarper, except case minp0.0_explicit "
                     "(MinP(0.0), a no-op)",
        "tie_order_dependent": "set on a case whose `expected` depends on the order torch.sort "
                               "(stable=False, implementation-defined) gives tied logits at the "
                               "top-p cut; `expected_stable_sort` is the same processors with "
                               "torch.sort(stable=True), i.e. ties in index order. Every other "
                               "case gives identical scores either way.",
        "cases": out_cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({len(out_cases)} cases)")


if __name__ == "__main__":
    main()
