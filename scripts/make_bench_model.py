"""Build a random-weight model of the REAL LFM2.5-VL-450M size for benchmarks (never committed).

    /work/venvs/ref/bin/python scripts/make_bench_model.py [--out DIR] [--int8] [--skip-check]
                                                           [--attention gqa|plain] [--rope-positions N]

Writes (default DIR = bench-models/real/ at the repository root, ignored by git)
  onnx/vision_encoder.onnx, onnx/embed_tokens.onnx, onnx/decoder_model_merged.onnx
      fp32, legacy exporter, the official LFM2.5-VL-450M-ONNX I/O contract (the export
      wrappers and dim renaming of fixture_lib.py). Each graph is under protobuf's 2 GiB limit
      (the decoder is ~1.4 GB), so each is one file; a graph over it would be re-saved with an
      ``<name>.onnx_data`` sidecar. The decoder's attention is, by default (``--attention gqa``),
      com.microsoft.GroupQueryAttention fed from the attention mask as in the official export
      (fixture_lib.export_gqa_decoder, as the tiny16-gqa fixture), with cos/sin caches of
      ``--rope-positions`` rows (default: the config's max_position_embeddings, 128000, as the
      official graph): the longest total sequence (prompt + new tokens) the graph accepts.
      ``--attention plain`` exports fixture_lib's plain-ONNX attention instead (positions from
      the mask width; lfm then never batches decoder steps).
  onnx/decoder_model_merged_q8.onnx, onnx/vision_encoder_q8.onnx      (with --int8)
      onnxruntime.quantization.quantize_dynamic, QInt8 weights (embed_tokens has no q8 upstream).
  tokenizer.json        synthetic byte-level BPE, vocab 65536 with the real special-token ids
                        (fixture_lib.build_tokenizer), merges learned from a seeded corpus
  config.json, generation_config.json, tokenizer_config.json, chat_template.jinja,
  preprocessor_config.json, processor_config.json
  hf/                   the same weights as a transformers checkpoint (safetensors) + tokenizer
  BENCH_MODEL.json      seeds, versions, timings, sizes, sha256 of every file

The config is the real one (``--reference-data``/config.json) in fp32; weights are drawn by
``fixture_lib.init_model`` (N(0, 1/sqrt(fan_in)), fixed seed). Deterministic: fixed seeds for the
corpus, the merges (tokenizers' BpeTrainer, deterministic) and the weights. Needs about 8 GB of RAM
and ~6 GB of disk; a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import sys
import time

os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")  # torch._check has no ONNX lowering
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import fixture_lib as L  # noqa: E402

SCRIPT_VERSION = "1.1"
VOCAB = 65536
CORPUS_SEED = 65536
WEIGHT_SEED = 450
EOS_ID, PAD_ID, IMAGE_ID = 7, 0, 396
GRAPHS = ["vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"]
REF_FILES = ["tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
             "processor_config.json"]
PROTOBUF_LIMIT = 2 * 1024 ** 3 - 64 * 1024 ** 2  # leave a margin under 2 GiB
T_START = time.time()


def log(*a):
    print(f"[{time.time() - T_START:7.1f}s]", *a, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# --------------------------------------------------------------------------------------
# tokenizer: 64768 merges need a much larger corpus than fixture_lib's, and a fast learner
# --------------------------------------------------------------------------------------

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "y", "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sc",
           "sh", "sk", "sl", "sm", "sn", "sp", "st", "str", "sw", "th", "tr", "wh", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "au", "ei"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "d", "ng", "nd", "st", "ck", "th", "x", "rt",
          "ll", "ss", "nt"]
_ACCENTS = ["é", "è", "à", "ü", "ö", "ä", "ñ", "ç", "ø", "å", "ß", "ł"]
_CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 600)] + [chr(c) for c in range(0x3041, 0x3097)]
_CYRILLIC = [chr(c) for c in range(0x430, 0x450)]


def _lexicon(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct pseudo-words: English-like syllables (some accented), CJK, Cyrillic."""
    seen, out = set(), []
    while len(out) < n:
        r = rng.random()
        if r < 0.85:
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                        for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4])))
            if rng.random() < 0.05:
                i = rng.randrange(len(w) + 1)
                w = w[:i] + rng.choice(_ACCENTS) + w[i:]
        elif r < 0.93:
            w = "".join(rng.choice(_CJK) for _ in range(rng.randint(1, 4)))
        else:
            w = "".join(rng.choice(_CYRILLIC) for _ in range(rng.randint(2, 9)))
        if w and w not in seen:
            seen.add(w)
            out.append(w)
    return out


def bench_corpus(seed: int = CORPUS_SEED, n_words: int = 300_000, n_tokens: int = 2_500_000) -> list[str]:
    """~27 MB of text: fixture_lib's English corpus (3x) then Zipf-distributed sentences over a
    seeded pseudo-word lexicon, with numbers, punctuation and JSON-ish lines."""
    rng = random.Random(seed)
    lex = _lexicon(rng, n_words)
    cum, s = [], 0.0
    for i in range(n_words):
        s += 1.0 / (i + 10)
        cum.append(s)
    drawn = rng.choices(lex, cum_weights=cum, k=n_tokens)
    lines, i = [], 0
    while i < len(drawn):
        k = rng.randint(4, 18)
        ws = drawn[i:i + k]
        i += k
        if rng.random() < 0.5:
            ws[0] = ws[0].capitalize()
        r = rng.random()
        if r < 0.1:
            ws.append(str(rng.randint(0, 99999)))
        line = " ".join(ws) + rng.choice([".", ".", ",", "?", "!", ":", ";", ""])
        if r > 0.95:
            line = '{"%s": "%s", "%s": %d}' % (ws[0], " ".join(ws[1:]), ws[-1], rng.randint(0, 999))
        lines.append(line)
    return [L.training_corpus(1234)] * 3 + ["\n".join(lines)]


def learn_merges(num_merges: int) -> list[tuple[str, str]]:
    """BPE merges over the same ByteLevel pre-tokenization fixture_lib uses, learned by
    tokenizers' (Rust, deterministic) BpeTrainer: the pure-Python learner is too slow for 64k."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=len(ByteLevel.alphabet()) + num_merges, min_frequency=0,
                                  show_progress=False, initial_alphabet=ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(bench_corpus(), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    if len(merges) < num_merges:
        raise RuntimeError(f"corpus gave only {len(merges)} merges, need {num_merges}")
    return merges[:num_merges]


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------


def real_config(ref: str):
    """The real config.json, in fp32."""
    from transformers import Lfm2VlConfig

    with open(os.path.join(ref, "config.json")) as f:
        d = json.load(f)
    d.pop("transformers.js_config", None)
    d["dtype"] = "float32"
    for k in ("text_config", "vision_config"):
        d[k]["dtype"] = "float32"
    cfg = Lfm2VlConfig.from_dict(d)
    assert cfg.text_config.vocab_size == VOCAB and cfg.text_config.hidden_size == 1024
    return cfg


def externalize_if_large(path: str) -> None:
    """Re-save a graph over protobuf's limit with one ``<name>.onnx_data`` sidecar."""
    import onnx

    if os.path.getsize(path) < PROTOBUF_LIMIT:
        return
    m = onnx.load(path)
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(path) + "_data", size_threshold=1024)


def ort_check(model, proc, onnx_dir: str, n_new: int = 8) -> dict:
    """onnxruntime greedy on the fp32 graphs vs transformers' generate: a text prompt and a
    one-image prompt (64 image tokens). Random weights: logits std ~1."""
    import numpy as np
    import torch

    runner = L.OrtRunner(onnx_dir)
    out = {}
    img = L.grad_image(256, 256)
    cases = {"text": ([{"role": "user", "content": "Describe a red car near the river."}], []),
             "image": ([{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "What is this?"}]}], [img])}
    for name, (messages, imgs) in cases.items():
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        kw = dict(min_image_tokens=64, max_image_tokens=64, min_tiles=1, max_tiles=1, use_thumbnail=False)
        inputs = proc(images=[imgs] if imgs else None, text=[prompt], return_tensors="pt",
                      input_data_format="channels_last", **(kw if imgs else {}))
        t0 = time.time()
        with torch.no_grad():
            g = model.generate(**inputs, do_sample=False, max_new_tokens=n_new, repetition_penalty=1.0,
                               eos_token_id=EOS_ID, pad_token_id=PAD_ID, return_dict_in_generate=True,
                               output_logits=True)
        t_hf = time.time() - t0
        ids = inputs["input_ids"][0].tolist()
        hf_new = g.sequences[0, len(ids):].tolist()
        hf_new = hf_new[:hf_new.index(EOS_ID)] if EOS_ID in hf_new else hf_new
        first = g.logits[0][0].numpy()
        per_image = []
        for im in imgs:
            r = proc.image_processor([im], return_tensors="np", input_data_format="channels_last", **kw)
            per_image.append((r["pixel_values"], r["pixel_attention_mask"], r["spatial_shapes"]))
        t0 = time.time()
        o_new, o_first = runner.greedy(ids, per_image, n_new, EOS_ID)
        t_ort = time.time() - t0
        diff = float(np.abs(o_first - first).max())
        tol = 1e-3 * max(1.0, float(np.abs(first).max()))
        out[name] = {"prompt_tokens": len(ids), "image_tokens": ids.count(IMAGE_ID), "ids_equal": o_new == hf_new,
                     "first_logits_max_abs_diff": diff, "tol": tol, "hf_seconds": round(t_hf, 2),
                     "ort_seconds_1thread": round(t_ort, 2), "ok": o_new == hf_new and diff <= tol}
        log(f"ORT check {name}: {out[name]}")
    del runner
    return out


def q8_check(onnx_dir: str) -> dict:
    """The q8 graphs load and run; their outputs compared with fp32 on the same random inputs
    (information only: random weights quantise worse than trained ones)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    rng = np.random.RandomState(0)
    dec = {"inputs_embeds": (rng.randn(1, 8, 1024) * 0.03).astype(np.float32),
           "attention_mask": np.ones((1, 8), np.int64)}
    pam = np.zeros((1, 1024), np.int64)
    pam[0, :256] = 1
    vis = {"pixel_values": rng.randn(1, 1024, 768).astype(np.float32), "pixel_attention_mask": pam,
           "spatial_shapes": np.array([[16, 16]], np.int64)}
    res = {}
    for base, feeds in [("decoder_model_merged", dec), ("vision_encoder", vis)]:
        outs = []
        for name in (f"{base}.onnx", f"{base}_q8.onnx"):
            s = ort.InferenceSession(os.path.join(onnx_dir, name), so, providers=["CPUExecutionProvider"])
            f = dict(feeds)
            for i in s.get_inputs():
                if i.name not in f:  # empty cache
                    f[i.name] = np.zeros([1, 1024, 3] if i.name.startswith("past_conv") else [1, 8, 0, 64],
                                         np.float32)
            outs.append(s.run(None, f)[0])
            del s
        a, b = outs
        r = {"max_abs_diff_vs_fp32": round(float(np.abs(a - b).max()), 4),
             "fp32_max_abs": round(float(np.abs(a).max()), 4)}
        if base.startswith("decoder"):
            r["argmax_agree"] = float(np.mean(np.argmax(a[0], -1) == np.argmax(b[0], -1)))
        res[f"{base}_q8.onnx"] = r
        log(f"q8 check {base}_q8.onnx: {r}")
    return res


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for p in ["torch", "transformers", "tokenizers", "onnx", "onnxruntime", "numpy", "safetensors"]:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-models", "real"))
    ap.add_argument("--int8", action="store_true", help="also write the q8 decoder and vision graphs")
    ap.add_argument("--reference-data", default=os.environ.get("LFM_REFERENCE_DATA", "/work/shared/reference/data"),
                    help="folder with the real config.json and the small tokenizer/processor config files")
    ap.add_argument("--skip-check", action="store_true", help="skip the onnxruntime-vs-transformers check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", choices=["gqa", "plain"], default="gqa",
                    help="decoder attention: com.microsoft.GroupQueryAttention fed from the mask, as the "
                         "official export (default), or fixture_lib's plain ONNX ops")
    ap.add_argument("--rope-positions", type=int, default=None,
                    help="rows of the GQA cos/sin caches = longest total sequence the decoder accepts "
                         "(default: the config's max_position_embeddings)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out, ref = os.path.abspath(args.out), args.reference_data
    onnx_dir, hf_dir = os.path.join(out, "onnx"), os.path.join(out, "hf")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(onnx_dir)
    timings, report = {}, {}

    # tokenizer --------------------------------------------------------------------------
    t0 = time.time()
    merges = learn_merges(VOCAB - L.MERGE_BASE)
    tok = L.build_tokenizer(VOCAB, merges)
    tok.save(os.path.join(out, "tokenizer.json"))
    for f in REF_FILES:
        shutil.copyfile(os.path.join(ref, f), os.path.join(out, f))
    timings["tokenizer_s"] = time.time() - t0
    log(f"tokenizer: vocab {tok.get_vocab_size()}, {len(merges)} merges, "
        f"{timings['tokenizer_s']:.1f}s, peak RSS {peak_rss_gb():.1f} GB")
    del tok, merges
    gc.collect()

    # model + fp32 export ----------------------------------------------------------------
    from transformers import Lfm2VlProcessor

    t0 = time.time()
    model = L.init_model(real_config(ref), WEIGHT_SEED)
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    n_params = int(sum(p.numel() for p in model.parameters()))
    timings["init_weights_s"] = time.time() - t0
    log(f"model: {n_params:,} parameters, {timings['init_weights_s']:.1f}s")
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)

    rope_positions = args.rope_positions or int(model.config.text_config.max_position_embeddings)
    t0 = time.time()
    with torch.no_grad():
        L.export_onnx(model, onnx_dir)
        if args.attention == "gqa":  # replace the plain decoder by the official-style one
            gc.collect()
            L.export_gqa_decoder(model, onnx_dir, max_positions=rope_positions)
    for g in GRAPHS:
        externalize_if_large(os.path.join(onnx_dir, g))
    timings["onnx_export_s"] = time.time() - t0
    log(f"ONNX export (3 graphs, legacy exporter, {args.attention} attention"
        f"{f', cos/sin caches of {rope_positions} rows' if args.attention == 'gqa' else ''}): "
        f"{timings['onnx_export_s']:.1f}s, peak RSS {peak_rss_gb():.1f} GB")

    proc = Lfm2VlProcessor.from_pretrained(out)
    ptok = proc.tokenizer
    assert (ptok.bos_token_id, ptok.eos_token_id, ptok.pad_token_id) == (1, EOS_ID, PAD_ID)
    assert ptok.convert_tokens_to_ids("<image>") == IMAGE_ID and len(ptok) == VOCAB

    # transformers checkpoint ------------------------------------------------------------
    t0 = time.time()
    model.save_pretrained(hf_dir)  # safetensors
    for f in ["tokenizer.json", *REF_FILES]:
        shutil.copyfile(os.path.join(out, f), os.path.join(hf_dir, f))
    timings["hf_save_s"] = time.time() - t0
    log(f"HF checkpoint saved: {timings['hf_save_s']:.1f}s")

    if not args.skip_check:
        t0 = time.time()
        report["ort_check"] = ort_check(model, proc, onnx_dir)
        timings["ort_check_s"] = time.time() - t0
    del model
    gc.collect()

    # int8 -------------------------------------------------------------------------------
    if args.int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for g in ["decoder_model_merged", "vision_encoder"]:
            t0 = time.time()
            src, dst = os.path.join(onnx_dir, f"{g}.onnx"), os.path.join(onnx_dir, f"{g}_q8.onnx")
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
                             use_external_data_format=os.path.getsize(src) >= PROTOBUF_LIMIT)
            timings[f"quantize_{g}_s"] = time.time() - t0
            log(f"quantize_dynamic {g} -> {os.path.basename(dst)}: {timings[f'quantize_{g}_s']:.1f}s, "
                f"{mb(os.path.getsize(dst))}, peak RSS {peak_rss_gb():.1f} GB")
            gc.collect()
        if not args.skip_check:
            report["q8_check"] = q8_check(onnx_dir)

    # summary ----------------------------------------------------------------------------
    files = {}
    for root, _, names in os.walk(out):
        for n in sorted(names):
            p = os.path.join(root, n)
            files[os.path.relpath(p, out)] = {"bytes": os.path.getsize(p), "sha256": L.sha256_file(p)}
    timings["total_s"] = time.time() - T_START
    summary = {
        "generator": "scripts/make_bench_model.py", "script_version": SCRIPT_VERSION,
        "config": "reference config.json (LFM2.5-VL-450M), fp32", "num_parameters": n_params,
        "weight_seed": WEIGHT_SEED, "weight_init": "fixture_lib.init_model: every >=2-D weight ~ "
        "N(0, 1/sqrt(fan_in)), biases ~ N(0, 0.02); tied embeddings",
        "tokenizer": {"vocab": VOCAB, "corpus_seed": CORPUS_SEED, "learner": "tokenizers.trainers.BpeTrainer"},
        "export": {"exporter": "torch.onnx legacy (dynamo=False)", "opset": 18,
                   "decoder_attention": "com.microsoft.GroupQueryAttention (fixture_lib.export_gqa_decoder)"
                   if args.attention == "gqa" else "plain ONNX ops (fixture_lib.export_onnx)",
                   "rope_cache_positions": rope_positions if args.attention == "gqa" else None,
                   "int8": "onnxruntime.quantization.quantize_dynamic, QInt8 weights" if args.int8 else None},
        "threads": args.threads, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "peak_rss_gb": round(peak_rss_gb(), 2), **report, "versions": versions(), "files": files,
    }
    L.write_json(os.path.join(out, "BENCH_MODEL.json"), summary, indent=1)
    log("files:")
    for k, v in files.items():
        log(f"  {k:40s} {mb(v['bytes']):>12s}")
    log(f"total {mb(sum(v['bytes'] for v in files.values()))}; timings {summary['timings_s']}; "
        f"peak RSS {summary['peak_rss_gb']} GB")
    bad = [k for k, v in report.get("ort_check", {}).items() if not v["ok"]]
    if bad:
        log(f"ORT check MISMATCH: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
