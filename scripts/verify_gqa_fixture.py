"""Check tests/fixtures/models/tiny16-gqa (the GroupQueryAttention decoder) with onnxruntime.

    /work/venvs/ref/bin/python scripts/verify_gqa_fixture.py [--fixtures DIR] [--steps N]

(a) Batch 1: for every case of golden/generate_tiny16.json, the prompt ids from the fixture's
    processor equal the golden's; prefill (mask of ones [1, past+S], one vision call per
    image, features spliced at <image> positions) plus a greedy loop reproduces the
    first-step logits within 1e-4*max(1, max|logit|) and the greedy new_ids exactly, for
    repetition_penalty 1.0, 1.05 and 1.5 (transformers' rule: every id so far, prompt
    included, logit < 0 ? logit*p : logit/p).
(b) Batched decoding: a few golden prompts of different lengths are prefilled alone
    (batch 1); their conv states are stacked along batch and their KV caches right-padded
    with zeros to a common width W; then greedy steps run for all rows at once with
    inputs_embeds [B,1,H] and attention_mask [B, W+1] whose row r is len_r+1 ones then zeros
    (after each step W += 1, len_r += 1). Per-row ids must equal the batch-1 ids and logits
    must agree within 1e-4*max(1, max|logit|). Runs with W = longest row and W = longest + 5.
(c) Contrast: the same batched procedure on models/tiny16 (whose decoder derives positions
    from the mask width and masks conv inputs by the mask's last column); reported only.

Exits non-zero if (a) or (b) fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fixture_lib as L  # noqa: E402
import make_fixtures as MF  # noqa: E402  (imports torch + the torchvision guard)
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

BATCH_CASES = ["text_only", "one_image", "multi_turn", "two_images"]


class Model:
    def __init__(self, d):
        from transformers import Lfm2VlProcessor

        so = ort.SessionOptions()
        so.intra_op_num_threads = 2

        def sess(n):
            return ort.InferenceSession(os.path.join(d, "onnx", n), so, providers=["CPUExecutionProvider"])
        self.vision, self.embed, self.dec = (sess(n) for n in
                                             ["vision_encoder.onnx", "embed_tokens.onnx",
                                              "decoder_model_merged.onnx"])
        self.in_names = [i.name for i in self.dec.get_inputs()]
        self.out_names = [o.name for o in self.dec.get_outputs()]
        assert "position_ids" not in self.in_names
        self.proc = Lfm2VlProcessor.from_pretrained(d)

    def embed_ids(self, ids):
        return self.embed.run(None, {"input_ids": np.asarray(ids, np.int64)})[0]

    def prompt_embeds(self, case):
        kw = MF.BUDGETS[case["budget"]]
        imgs = [L.grad_image(im["width"], im["height"]) for im in case["images"]]
        text = self.proc(images=[imgs] if imgs else None, text=[case["prompt_text"]], return_tensors="np",
                         input_data_format="channels_last", **kw)
        ids = np.asarray(text["input_ids"])[0].tolist()
        emb = self.embed_ids([ids])
        if imgs:
            feats = []
            for im in imgs:  # one vision call per image
                r = self.proc.image_processor([im], return_tensors="np", input_data_format="channels_last", **kw)
                feats.append(self.vision.run(None, {
                    "pixel_values": r["pixel_values"].astype(np.float32),
                    "pixel_attention_mask": r["pixel_attention_mask"].astype(np.int64),
                    "spatial_shapes": r["spatial_shapes"].astype(np.int64)})[0])
            feats = np.concatenate(feats)
            sel = np.asarray(ids) == MF.IMAGE_ID
            assert sel.sum() == feats.shape[0]
            emb[0, sel] = feats
        return ids, emb

    def empty_cache(self, batch=1):
        cache = {}
        for i in self.dec.get_inputs()[2:]:
            cache[i.name] = np.zeros([batch if s == "batch_size" else (0 if isinstance(s, str) else s)
                                      for s in i.shape], np.float32)
        return cache

    def run(self, x, mask, cache):
        outs = self.dec.run(None, {"inputs_embeds": x, "attention_mask": mask, **cache})
        cache = {n.replace("present_conv.", "past_conv.").replace("present.", "past_key_values."): v
                 for n, v in zip(self.out_names[1:], outs[1:])}
        return outs[0][:, -1], cache


def penalize(logits, seq, p):
    if p == 1.0:
        return logits
    out = logits.copy()
    idx = np.unique(np.asarray(seq))
    v = out[idx]
    out[idx] = np.where(v < 0, v * p, v / p)
    return out


def greedy1(m, ids, emb, steps, penalty=1.0, stop_on_eos=True):
    """Batch-1 greedy loop. Returns (new_ids, per-step raw logits, prefill state)."""
    logits, cache = m.run(emb, np.ones((1, emb.shape[1]), np.int64), m.empty_cache())
    state = (logits.copy(), {k: v.copy() for k, v in cache.items()}, emb.shape[1])
    past, seq, new, all_logits = emb.shape[1], list(ids), [], []
    for _ in range(steps):
        all_logits.append(logits[0].copy())
        nxt = int(np.argmax(penalize(logits[0], seq, penalty)))
        if stop_on_eos and nxt == MF.EOS_ID:
            break
        new.append(nxt)
        seq.append(nxt)
        logits, cache = m.run(m.embed_ids([[nxt]]), np.ones((1, past + 1), np.int64), cache)
        past += 1
    return new, all_logits, state


def batched(m, states, steps, extra_pad=0):
    """states: per row (prefill logits [1,V], batch-1 cache, length). Returns per-row ids and
    per-step logits of the batched greedy decode (the first token comes from the prefill)."""
    lens = [s[2] for s in states]
    W = max(lens) + extra_pad
    cache = {}
    for name in states[0][1]:
        parts = [s[1][name] for s in states]
        if name.startswith("past_key_values."):
            parts = [np.pad(p, ((0, 0), (0, 0), (0, W - p.shape[2]), (0, 0))) for p in parts]
        cache[name] = np.concatenate(parts)
    B = len(states)
    tok = [int(np.argmax(s[0][0])) for s in states]
    ids, logs = [[t] for t in tok], [[s[0][0]] for s in states]
    lens = list(lens)
    for _ in range(steps):
        mask = np.zeros((B, W + 1), np.int64)
        for r in range(B):
            mask[r, :lens[r] + 1] = 1
        x = m.embed_ids([[t] for t in tok])
        logits, cache = m.run(x, mask, cache)
        for name, v in cache.items():
            if name.startswith("past_key_values."):
                assert v.shape[2] == W + 1, (name, v.shape)
        W += 1
        lens = [n + 1 for n in lens]
        tok = [int(np.argmax(logits[r])) for r in range(B)]
        for r in range(B):
            ids[r].append(tok[r])
            logs[r].append(logits[r].copy())
    return ids, logs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=os.path.join(MF.ROOT, "tests", "fixtures"))
    ap.add_argument("--steps", type=int, default=32, help="batched decode steps (>= 16)")
    args = ap.parse_args()
    fx = args.fixtures
    print("onnxruntime", ort.__version__)
    golden = json.load(open(os.path.join(fx, "golden", "generate_tiny16.json")))
    gqa = Model(os.path.join(fx, "models", "tiny16-gqa"))
    ops = {n.op_type for n in __import__("onnx").load(
        os.path.join(fx, "models", "tiny16-gqa", "onnx", "decoder_model_merged.onnx")).graph.node}
    assert "GroupQueryAttention" in ops
    failures = []

    # (a) batch 1 against transformers' goldens
    worst_a = 0.0
    for c in golden["cases"]:
        ids, emb = gqa.prompt_embeds(c)
        if ids != c["prompt_ids"]:
            failures.append(f"(a) {c['name']}: prompt ids differ")
        res = {}
        for p, key in [(1.0, "new_ids"), (1.05, "new_ids_rep_penalty_1_05"), (1.5, "new_ids_rep_penalty_1_5")]:
            new, logs, _ = greedy1(gqa, ids, emb, golden["max_new_tokens"], p)
            res[key] = new == c[key]
            if p == 1.0:
                first = np.asarray(c["first_logits"])
                diff = float(np.abs(logs[0] - first).max())
                rel = diff / max(1.0, float(np.abs(first).max()))
                worst_a = max(worst_a, rel)
        ok = all(res.values()) and rel <= 1e-4
        if not ok:
            failures.append(f"(a) {c['name']}: {res} rel {rel:.2e}")
        print(f"(a) {c['name']:22s} prompt {len(ids):5d} tok  ids==golden(rp 1.0/1.05/1.5): "
              f"{'/'.join(str(v) for v in res.values())}  first-step max|dlogit| {diff:.2e} "
              f"(rel {rel:.2e}) {'OK' if ok else 'FAIL'}")
    print(f"(a) worst first-step relative logit diff {worst_a:.2e}")

    # (b) batched decode after batch-1 prefills, right-padded KV, per-row mask sums
    cases = [c for c in golden["cases"] if c["name"] in BATCH_CASES]
    per_model = {}
    for label, m in [("tiny16-gqa", gqa), ("tiny16", Model(os.path.join(fx, "models", "tiny16")))]:
        refs, states = [], []
        for c in cases:
            ids, emb = m.prompt_embeds(c)
            new, logs, st = greedy1(m, ids, emb, args.steps + 1, stop_on_eos=False)
            if label == "tiny16-gqa":
                n = len(c["new_ids"])
                if new[:n] != c["new_ids"]:
                    failures.append(f"(b) {c['name']}: batch-1 ids differ from golden")
            refs.append((new, logs))
            states.append(st)
        per_model[label] = (refs, states, m)
    for label, (refs, states, m) in per_model.items():
        for extra in [0, 5]:
            ids, logs = batched(m, states, args.steps, extra)
            line = []
            for r, c in enumerate(cases):
                ref_ids, ref_logs = refs[r]
                ref_ids = ref_ids[:args.steps + 1]
                same = ids[r] == ref_ids
                first_div = next((k for k, (a, b) in enumerate(zip(ids[r], ref_ids)) if a != b), None)
                n = min(len(logs[r]), len(ref_logs))
                rel = max(float(np.abs(logs[r][k] - ref_logs[k]).max()) / max(1.0, float(np.abs(ref_logs[k]).max()))
                          for k in range(1, n))
                absd = max(float(np.abs(logs[r][k] - ref_logs[k]).max()) for k in range(1, n))
                line.append(f"{c['name']}(len {states[r][2]}): ids {'==' if same else f'!= (first at {first_div})'} "
                            f"max|dlogit| {absd:.2e} rel {rel:.2e}")
                if label == "tiny16-gqa" and (not same or rel > 1e-4):
                    failures.append(f"(b) W+{extra} {c['name']}: ids equal {same}, rel {rel:.2e}")
            tag = "(b)" if label == "tiny16-gqa" else "(c) contrast"
            print(f"{tag} {label}, B={len(cases)}, {args.steps} batched steps, W = longest+{extra}:")
            for s in line:
                print("      " + s)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("ALL OK")


if __name__ == "__main__":
    main()
