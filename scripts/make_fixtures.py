"""Generate the committed test fixtures and golden outputs under tests/fixtures/.

    /work/venvs/ref/bin/python scripts/make_fixtures.py [--reference-data DIR] [--skip-ort-check]
                                                        [--out DIR] [--only-variants]

Writes
  tests/fixtures/models/{tiny16,tiny6}/   tiny random-weight LFM2-VL models in the HF layout
  tests/fixtures/models/tiny16-gqa/       tiny16 with a GroupQueryAttention decoder (a variant:
                                          same weights and goldens, only the decoder differs)
  tests/fixtures/images/                  small image files (PNG variants, JPEG + EXIF, WebP)
  tests/fixtures/golden/*.json            reference outputs from transformers / PIL / tokenizers

Deterministic (fixed seeds, no dependence on the date except the chat-template date, which is
replaced by ``__DATE__``). See tests/fixtures/README.md for the formats.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import shutil
import struct
import sys
import time
import zlib

os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")  # torch._check has no ONNX lowering
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fixture_lib as L  # noqa: E402

torch = L.import_torch()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SCRIPT_VERSION = "1.0"
ROOT = os.path.dirname(HERE)
FIX = os.path.join(ROOT, "tests", "fixtures")
MAX_NEW_TOKENS = 24
EOS_ID, PAD_ID, IMAGE_ID = 7, 0, 396
CORPUS_SEED = 1234
NUM_MERGES = 256  # enough for the largest vocab (1024 - 768)
DATE_FORMAT = "%Y-%m-%d"

BUDGETS = {
    "default": dict(min_image_tokens=64, max_image_tokens=256, min_tiles=2, max_tiles=10,
                    use_thumbnail=True, max_pixels_tolerance=2.0),
    "fast": dict(min_image_tokens=32, max_image_tokens=64, min_tiles=2, max_tiles=4,
                 use_thumbnail=False, max_pixels_tolerance=2.0),
    "single": dict(min_image_tokens=16, max_image_tokens=64, min_tiles=1, max_tiles=1,
                   use_thumbnail=False, max_pixels_tolerance=2.0),
    # lfm.ImageBudget.single_tile(): min == max, so smart_resize's upscaling overshoots the cap
    "single_tile": dict(min_image_tokens=64, max_image_tokens=64, min_tiles=1, max_tiles=1,
                        use_thumbnail=False, max_pixels_tolerance=2.0),
}
PREPROCESS_SIZES = {
    "default": [(1, 1), (16, 16), (31, 17), (32, 32), (64, 64), (256, 256), (300, 400),
                (320, 240), (384, 216), (480, 270), (512, 512), (640, 480), (720, 730),
                (723, 724), (730, 720), (768, 768), (900, 1200), (1024, 768), (768, 1024),
                (1024, 1024), (1280, 720), (1600, 800), (800, 1600), (1920, 1080), (1080, 1920),
                (2560, 1440), (3000, 2000), (4032, 3024), (32, 1024), (1024, 32), (20, 2000),
                (2000, 20), (64, 1000), (1, 8000), (8000, 1), (3, 700)],
    "fast": [(256, 256), (640, 480), (1024, 1024), (1920, 1080)],
    "single": [(640, 480), (1920, 1080), (4096, 2160)],
    "single_tile": [(100, 75), (40, 30), (10, 400), (300, 10), (250, 180), (16, 16), (640, 480)],
}
SAMPLE_TARGET = 4000  # ~samples per entry in preprocess.json


def log(*a):
    print(*a, flush=True)


def versions():
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for p in ["torch", "torchvision", "transformers", "tokenizers", "onnx", "onnxruntime",
              "onnxscript", "numpy", "pillow", "jinja2"]:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


def make_model_dir(name, spec, merges, ref):
    from transformers import Lfm2VlProcessor

    d = os.path.join(FIX, "models", name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "onnx"))
    t0 = time.time()
    model = L.build_model(spec)
    L.export_onnx(model, os.path.join(d, "onnx"))
    log(f"[{name}] built + exported in {time.time() - t0:.1f}s")
    model.config.save_pretrained(d)
    model.generation_config.save_pretrained(d)
    L.build_tokenizer(spec["vocab"], merges).save(os.path.join(d, "tokenizer.json"))
    for f in ["tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "processor_config.json"]:
        shutil.copyfile(os.path.join(ref, f), os.path.join(d, f))
    proc = Lfm2VlProcessor.from_pretrained(d)
    tok = proc.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 7, 0), \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID and len(tok) == spec["vocab"]
    return d, model, proc


def write_provenance(name, spec, d, model, merges, extra=None):
    files = {}
    for root, _, names in os.walk(d):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, d)
            if rel != "PROVENANCE.json":
                files[rel] = {"sha256": L.sha256_file(p), "bytes": os.path.getsize(p)}
    prov = {
        "generator": "scripts/make_fixtures.py", "script_version": SCRIPT_VERSION,
        "seed": spec["seed"], "weight_init": "every >=2-D weight ~ N(0, 1/sqrt(fan_in)), biases "
        "~ N(0, 0.02); torch.Generator seeded with seed*1000+1; tied embeddings",
        "spec": {k: v for k, v in spec.items()},
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "tokenizer": {"corpus_seed": CORPUS_SEED, "num_merges": spec["vocab"] - L.MERGE_BASE,
                      "merges_learned": len(merges)},
        "export": {"exporter": "torch.onnx legacy (dynamo=False)", "opset": 18},
        "onnx_io": {f: L.describe_onnx(os.path.join(d, "onnx", f)) for f in
                    ["vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"]},
        "config": model.config.to_dict(),
        "versions": versions(), "files": dict(sorted(files.items())),
    }
    if extra:
        prov.update(extra)
    L.write_json(os.path.join(d, "PROVENANCE.json"), prov, indent=1)


def make_variant_dir(name, spec):
    """A variant of an already written base model directory: every file of the base except
    PROVENANCE.json and the decoder is copied unchanged, then the variant's decoder is
    exported from the same spec and seed (so the same weights)."""
    base = os.path.join(FIX, "models", spec["base"])
    d = os.path.join(FIX, "models", name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(os.path.join(d, "onnx"))
    for root, _, names in os.walk(base):
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(root, n), base)
            if rel not in ("PROVENANCE.json", os.path.join("onnx", "decoder_model_merged.onnx")):
                os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
                shutil.copyfile(os.path.join(base, rel), os.path.join(d, rel))
    t0 = time.time()
    model = L.build_model(spec)
    assert spec["attention"] == "gqa", spec
    L.export_gqa_decoder(model, os.path.join(d, "onnx"))
    log(f"[{name}] built + GQA decoder exported in {time.time() - t0:.1f}s")
    return d, model


def check_variant(name, d, golden):
    """The variant's ONNX greedy loop against the base model's transformers goldens."""
    from transformers import Lfm2VlProcessor

    proc = Lfm2VlProcessor.from_pretrained(d)
    runner = L.OrtRunner(os.path.join(d, "onnx"))
    report = []
    for c in golden["cases"]:
        kw = BUDGETS[c["budget"]]
        imgs = [L.grad_image(im["width"], im["height"]) for im in c["images"]]
        text = proc(images=[imgs] if imgs else None, text=[c["prompt_text"]], return_tensors="np",
                    input_data_format="channels_last", **kw)
        assert np.asarray(text["input_ids"])[0].tolist() == c["prompt_ids"], (name, c["name"])
        per_image = []
        for im in imgs:
            r = proc.image_processor([im], return_tensors="np", input_data_format="channels_last", **kw)
            per_image.append((r["pixel_values"], r["pixel_attention_mask"], r["spatial_shapes"]))
        o_new, o_first = runner.greedy(c["prompt_ids"], per_image, golden["max_new_tokens"], EOS_ID)
        first = np.asarray(c["first_logits"], np.float64)
        diff = float(np.abs(o_first - first).max())
        tol = 1e-4 * max(1.0, float(np.abs(first).max()))
        ok = o_new == c["new_ids"] and diff <= tol
        report.append({"model": name, "case": c["name"], "prompt_tokens": len(c["prompt_ids"]),
                       "ids_equal": o_new == c["new_ids"], "first_logits_max_abs_diff": diff,
                       "tol": tol, "ok": ok})
        log(f"  ORT check {name}/{c['name']} (goldens of {golden['model']}): prompt "
            f"{len(c['prompt_ids'])} tok, ids_equal={o_new == c['new_ids']}, max|dlogit|={diff:.2e} "
            f"(tol {tol:.2e}) {'OK' if ok else 'MISMATCH'}")
    return report


def build_variants(merges, check_ort):
    report = []
    for name, spec in L.VARIANT_SPECS.items():
        d, model = make_variant_dir(name, spec)
        golden_rel = f"golden/generate_{spec['base']}.json"
        if check_ort:
            report += check_variant(name, d, json.load(open(os.path.join(FIX, golden_rel))))
        write_provenance(name, spec, d, model, merges, extra={
            "variant_of": f"models/{spec['base']}",
            "variant": {
                "goldens": golden_rel + " (same spec, seed and weights as the base)",
                "copied_from_base": "every file except PROVENANCE.json and "
                                    "onnx/decoder_model_merged.onnx",
                "decoder": "fixture_lib.export_gqa_decoder: per attention layer q/k/v proj -> per-head "
                           "q/k RMSNorm -> com.microsoft.GroupQueryAttention (opset 1; num_heads, "
                           "kv_num_heads, scale=1/sqrt(head_dim), do_rotary=1, rotary_interleaved=0, "
                           "local_window_size=-1, softcap=0; cos_cache/sin_cache initializers) -> "
                           "o_proj; seqlens_k = Cast<int32>(ReduceSum(attention_mask, axes=[1], "
                           "keepdims=0) - 1), total_sequence_length = Cast<int32>(Gather(Shape("
                           "attention_mask), 1)); conv layers unmasked, present_conv = last "
                           "conv_L_cache columns of concat(past_conv, B*x); no position_ids",
                "rope_cache_positions": L.GQA_ROPE_POSITIONS,
                "opsets": {"ai.onnx": 18, "com.microsoft": 1},
            }})
    return report


# --------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------


def _png_rgb16(path, arr16):
    """Minimal PNG writer for 16-bit RGB (PIL cannot write 48-bit PNGs)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + \
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def make_images():
    d = os.path.join(FIX, "images")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    Image.fromarray(L.grad_image(64, 48)).save(os.path.join(d, "grad_64x48.png"))

    g = L.grad_image(40, 30)
    y, x = np.mgrid[0:30, 0:40]
    alpha = ((x * 255) // 39 + (y * 4)) % 256  # varying alpha, includes 0 and 255
    alpha[0, 0], alpha[-1, -1] = 0, 255
    Image.fromarray(np.dstack([g, alpha.astype(np.uint8)]), "RGBA").save(
        os.path.join(d, "rgba_40x30.png"))

    y, x = np.mgrid[0:21, 0:33]
    gray = ((x * 255) // 32 ^ (y * 12)).astype(np.uint8)
    Image.fromarray(gray, "L").save(os.path.join(d, "gray_33x21.png"))

    y, x = np.mgrid[0:16, 0:24]
    la = np.dstack([((x * 255) // 23).astype(np.uint8), ((y * 255) // 15).astype(np.uint8)])
    Image.fromarray(la, "LA").save(os.path.join(d, "gray_alpha_24x16.png"))

    pal = Image.fromarray(L.grad_image(32, 24)).quantize(colors=16, method=Image.Quantize.MEDIANCUT,
                                                        dither=Image.Dither.NONE)
    pal.save(os.path.join(d, "palette_32x24.png"))

    g8 = L.grad_image(20, 10).astype(np.uint16)
    y, x = np.mgrid[0:10, 0:20]
    low = ((x * 37 + y * 91) & 255).astype(np.uint16)  # low byte varies: exposes 16->8 rounding
    _png_rgb16(os.path.join(d, "rgb16_20x10.png"), (g8 << 8) | low[..., None])

    jpg = Image.fromarray(L.grad_image(120, 80))
    jpg.save(os.path.join(d, "grad_120x80.jpg"), quality=90)
    for n in range(2, 9):
        ex = Image.Exif()
        ex[0x0112] = n
        jpg.save(os.path.join(d, f"exif_{n}.jpg"), quality=90, exif=ex.tobytes())

    Image.fromarray(L.grad_image(50, 40)).save(os.path.join(d, "grad_50x40.webp"), lossless=True)
    for f in sorted(os.listdir(d)):
        assert os.path.getsize(os.path.join(d, f)) < 60_000, f
    return d


def golden_decode(img_dir):
    from transformers.image_utils import load_image

    out = {"loader": "transformers.image_utils.load_image (PIL open, ImageOps.exif_transpose, "
                     "convert('RGB'))",
           "sample_positions": "k = 0..63: x = ((k % 8) * (W - 1)) // 7, y = ((k // 8) * (H - 1)) // 7",
           "files": []}
    for f in sorted(os.listdir(img_dir)):
        p = os.path.join(img_dir, f)
        src = Image.open(p)
        orient = src.getexif().get(0x0112)
        rgb = np.asarray(load_image(p), dtype=np.uint8)
        h, w, _ = rgb.shape
        samples = []
        for k in range(64):
            x, y = ((k % 8) * (w - 1)) // 7, ((k // 8) * (h - 1)) // 7
            samples.append([x, y, *map(int, rgb[y, x])])
        out["files"].append({
            "file": f, "source_mode": src.mode, "source_size": list(src.size),
            "exif_orientation": orient, "width": w, "height": h,
            "mean": [round(float(rgb[..., c].mean()), 6) for c in range(3)],
            "sha256": __import__("hashlib").sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest(),
            "samples": samples})
    return out


# --------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------


def _entry_pixels(pv, mask, e):
    real = pv[e][mask[e] == 1].astype(np.float64)
    n_real = real.shape[0]
    flat = real.reshape(-1)
    stride = max(1, n_real * 768 // SAMPLE_TARGET)
    levels = np.clip(np.rint(flat[::stride] * 127.5 + 127.5), 0, 255).astype(np.uint8)
    return {"entry_sum": round(float(real.sum()), 4), "entry_abs_sum": round(float(np.abs(real).sum()), 4),
            "sample_stride": stride, "num_samples": int(levels.size),
            "samples_b64": base64.b64encode(levels.tobytes()).decode("ascii")}


def preprocess_case(image_proc, proc, w, h, budget):
    kw = BUDGETS[budget]
    img = L.grad_image(w, h)
    rec = {"width": w, "height": h, "budget": budget}
    try:
        r = image_proc([img], do_image_splitting=True, return_row_col_info=True, return_tensors="np",
                       input_data_format="channels_last", **kw)
        text = proc(images=[[img]], text=["<image>"], return_tensors="np", input_data_format="channels_last",
                    **kw)
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    pv, mask = np.asarray(r["pixel_values"]), np.asarray(r["pixel_attention_mask"])
    spatial = np.asarray(r["spatial_shapes"]).tolist()
    rows, cols = int(r["image_rows"][0]), int(r["image_cols"][0])
    multi = rows * cols > 1
    thumb = spatial[-1] if (multi and kw["use_thumbnail"]) else None
    ids = np.asarray(text["input_ids"])[0].tolist()
    toks = proc.tokenizer.convert_ids_to_tokens(ids)
    rec.update({
        "rows": rows, "cols": cols,
        "tile": [spatial[0][0] * 16, spatial[0][1] * 16],
        "thumbnail": [thumb[0] * 16, thumb[1] * 16] if thumb else None,
        "image_sizes": [int(v) for v in r["image_sizes"][0]],
        "num_entries": len(spatial), "num_image_tokens": ids.count(IMAGE_ID),
        "placeholder": L.run_length(toks),
        "spatial_shapes": spatial,
        "max_num_patches": int(pv.shape[1]),
        "real_patches": [int(m.sum()) for m in mask],
        "entries": [_entry_pixels(pv, mask, e) for e in range(pv.shape[0])],
    })
    assert rec["num_entries"] == rows * cols + (1 if thumb else 0)
    return rec


def golden_preprocess(proc):
    from transformers import Lfm2VlImageProcessor

    image_proc = Lfm2VlImageProcessor()
    cases = []
    for budget, sizes in PREPROCESS_SIZES.items():
        for w, h in sizes:
            cases.append(preprocess_case(image_proc, proc, w, h, budget))
    return {"image_processor": type(image_proc).__name__, "image": "grad pattern (see README)",
            "sample_target": SAMPLE_TARGET,
            "input_data_format": "channels_last (passed explicitly: without it transformers guesses the "
                                 "layout and reads an HxWx3 array with H = 1 or 3 as channels-first)",
            "level_encoding": "uint8 = clip(rint(v * 127.5 + 127.5), 0, 255), rint = half to even",
            "budgets": BUDGETS, "cases": cases}


# --------------------------------------------------------------------------------------
# chat template / tokenizer
# --------------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the weather for a city — returns °C; use when temp < 0 & wind > 5",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "options": {"type": "object", "properties": {
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1}}}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search",
        "description": "Search the <web> & return results",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"},
            "filters": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "value": {"type": "string"}}}}},
            "required": ["query"]}}},
]

IMG = {"type": "image"}


def _txt(t):
    return {"type": "text", "text": t}


CHAT_CASES = [
    ("user_text", [{"role": "user", "content": "Hello!"}], None, True),
    ("user_image_then_text", [{"role": "user", "content": [IMG, _txt("Describe this image.")]}], None, True),
    ("user_text_then_image", [{"role": "user", "content": [_txt("What is this?"), IMG]}], None, True),
    ("two_images_around_text", [{"role": "user", "content": [IMG, _txt("Compare these two."), IMG]}],
     None, True),
    ("system_and_user", [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Hi"}], None, True),
    ("multi_turn", [{"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And 3+3?"}], None, True),
    ("thinking_last_assistant", [{"role": "user", "content": "Think first."},
                                 {"role": "assistant", "content": "Done.", "thinking": "Let me think."}],
     None, False),
    ("thinking_non_last_assistant", [{"role": "user", "content": "Q1"},
                                     {"role": "assistant", "content": "A1", "thinking": "hidden"},
                                     {"role": "user", "content": "Q2"},
                                     {"role": "assistant", "content": "A2", "thinking": "shown"}],
     None, False),
    ("think_tag_in_non_last_content", [{"role": "user", "content": "Q1"},
                                       {"role": "assistant", "content": "<think>old reasoning</think>\n  A1  "},
                                       {"role": "user", "content": "Q2"},
                                       {"role": "assistant", "content": "A2"},
                                       {"role": "user", "content": "Q3"}], None, True),
    ("think_tag_in_last_content", [{"role": "user", "content": "Q1"},
                                   {"role": "assistant", "content": "<think>kept</think> A1"}], None, False),
    ("tools", [{"role": "user", "content": "Weather in Paris?"}], TOOLS, True),
    ("tools_with_system", [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Weather in Paris?"}], TOOLS, True),
    ("assistant_tool_calls", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {
                "city": "Paris", "options": {"unit": "c", "days": 2}}}},
            {"type": "function", "function": {"name": "search", "arguments": {
                "query": "paris weather", "limit": 3, "exact": True, "score": 0.5}}}]},
        {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
    ], TOOLS, True),
    ("tool_role_message", [{"role": "user", "content": "Call it."},
                           {"role": "tool", "content": "result: 42"}], None, True),
    ("no_generation_prompt", [{"role": "user", "content": "Hello!"},
                              {"role": "assistant", "content": "Hi there."}], None, False),
    ("multiple_text_parts", [{"role": "user", "content": [_txt("Part one. "), _txt("Part two."),
                                                          _txt("\nPart three.")]}], None, True),
    ("unicode_emoji", [{"role": "user", "content": "Grüße 👋🏽 日本語 — ¿qué tal? <b>&amp;</b>"}], None, True),
    ("empty_system", [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], None, True),
    ("system_list_content_with_image", [{"role": "system", "content": [_txt("Sys "), _txt("prompt")]},
                                        {"role": "user", "content": [IMG, IMG, _txt("Two?")]}], None, True),
]


def _render(tok, template, messages, tools, agp):
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=agp, tokenize=False,
                                   chat_template=template)


def golden_chat(tok, ref):
    template = json.load(open(os.path.join(ref, "tokenizer_config.json")))["chat_template"]
    jinja = open(os.path.join(ref, "chat_template.jinja")).read()
    cases = []
    for name, messages, tools, agp in CHAT_CASES:
        d0 = datetime.date.today().strftime(DATE_FORMAT)
        out = _render(tok, template, messages, tools, agp)
        d1 = datetime.date.today().strftime(DATE_FORMAT)
        assert out == _render(tok, jinja, messages, tools, agp), name  # generation tags: same text
        out = out.replace(d0, "__DATE__").replace(d1, "__DATE__")
        cases.append({"name": name, "messages": messages, "tools": tools,
                      "add_generation_prompt": agp, "expected": out})
    return {"template_source": "tokenizer_config.json chat_template (chat_template.jinja renders "
                               "the same)", "date_format": DATE_FORMAT, "date_placeholder": "__DATE__",
            "cases": cases}


TOKENIZE_STRINGS = [
    "", " ", "a", "Hello", "Hello world", "Hello, world!", "  leading spaces", "trailing spaces   ",
    "multiple   spaces   between", "tabs\tand\ttabs", "line one\nline two", "\n\n\n", "\r\n windows",
    "What is 2+2?", "Describe this image.", "The image shows a red car near the river.",
    "1234567890", "3.14159 and 2,718", "The answer is 42, because 40 + 2 = 42.",
    '{"name": "window", "count": 7, "visible": true}', "def f(x):\n    return x * 2\n",
    "café naïve résumé", "Grüße aus Zürich", "日本語のテキスト", "中文测试", "한국어",
    "emoji 😀👍🏽🇫🇷", "👨‍👩‍👧‍👦 family", "mixed: abc日本😀xyz", "don't can't I'm we'll",
    "<|im_start|>user\nHi<|im_end|>\n", "<image>", "text<image>more text", "<|startoftext|>",
    "<|image_start|><|img_row_1_col_1|><image><image><|img_thumbnail|><|image_end|>",
    "<|pad|><|endoftext|>", "<|tool_call_start|>[f(x=1)]<|tool_call_end|>", "<think>hmm</think>",
    "a <b> & c", "UPPER lower MiXeD", "The the THE tHe", "  \n  \t  ",
]


def golden_tokenize(tok_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_json)
    cases = []
    for s in TOKENIZE_STRINGS:
        ids = tok.encode(s, add_special_tokens=False).ids
        cases.append({"text": s, "ids": ids, "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    return {"tokenizer": "models/tiny16/tokenizer.json", "add_special_tokens": False, "cases": cases}


# --------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------

GEN_CASES = [
    ("text_only", [{"role": "user", "content": "What is 2+2?"}], [], "default"),
    ("one_image", [{"role": "user", "content": [IMG, _txt("Describe this image.")]}], [(300, 400)],
     "default"),
    ("multi_tile", [{"role": "user", "content": [IMG, _txt("What is in this image?")]}], [(900, 1200)],
     "default"),
    ("two_images", [{"role": "user", "content": [IMG, _txt("Compare this image"), IMG,
                                                 _txt(" with that one. Which is brighter?")]}],
     [(256, 256), (640, 480)], "default"),
    ("multi_turn", [{"role": "system", "content": "You are a careful assistant."},
                    {"role": "user", "content": [IMG, _txt("What color is the car?")]},
                    {"role": "assistant", "content": "The car is red."},
                    {"role": "user", "content": "Are you sure?"}], [(320, 240)], "default"),
    ("one_image_fast_budget", [{"role": "user", "content": [IMG, _txt("Describe this image.")]}],
     [(640, 480)], "fast"),
]


def _generate(model, inputs, rep):
    with torch.no_grad():
        g = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                           repetition_penalty=rep, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                           return_dict_in_generate=True, output_logits=True)
    n = inputs["input_ids"].shape[1]
    new = g.sequences[0, n:].tolist()
    stopped = EOS_ID in new
    if stopped:
        new = new[:new.index(EOS_ID)]
    return new, stopped, g.logits[0][0].numpy()


def golden_generate(name, model, proc, onnx_dir, check_ort):
    runner = L.OrtRunner(onnx_dir) if check_ort else None
    cases, report = [], []
    for cname, messages, sizes, budget in GEN_CASES:
        kw = BUDGETS[budget]
        imgs = [L.grad_image(w, h) for w, h in sizes]
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = proc(images=[imgs] if imgs else None, text=[prompt], return_tensors="pt",
                      input_data_format="channels_last", **kw)
        ids = inputs["input_ids"][0].tolist()
        new, stopped, first = _generate(model, inputs, 1.0)
        new_rp, stopped_rp, _ = _generate(model, inputs, 1.05)
        new_rp15, stopped_rp15, _ = _generate(model, inputs, 1.5)
        cases.append({
            "name": cname, "budget": budget, "messages": messages,
            "images": [L.image_spec(w, h) for w, h in sizes], "prompt_text": prompt,
            "prompt_ids": ids, "image_token_count": ids.count(IMAGE_ID),
            "num_entries": int(inputs["pixel_values"].shape[0]) if imgs else 0,
            "new_ids": new, "stopped_on_eos": stopped,
            "first_logits": [L.round_sig(v) for v in first],
            "new_ids_rep_penalty_1_05": new_rp, "stopped_on_eos_rep_penalty_1_05": stopped_rp,
            "new_ids_rep_penalty_1_5": new_rp15, "stopped_on_eos_rep_penalty_1_5": stopped_rp15,
        })
        if runner is not None:
            per_image, total = [], 0
            for im in imgs:  # one vision call per image
                r = proc.image_processor([im], return_tensors="np", input_data_format="channels_last", **kw)
                per_image.append((r["pixel_values"], r["pixel_attention_mask"], r["spatial_shapes"]))
                total += r["pixel_values"].shape[0]
            if imgs:
                assert np.array_equal(np.concatenate([p[0] for p in per_image]), inputs["pixel_values"].numpy())
            o_new, o_first = runner.greedy(ids, per_image, MAX_NEW_TOKENS, EOS_ID)
            diff = float(np.abs(o_first - first).max())
            tol = 1e-4 * max(1.0, float(np.abs(first).max()))
            ok = o_new == new and diff <= tol
            report.append({"model": name, "case": cname, "prompt_tokens": len(ids), "ids_equal": o_new == new,
                           "first_logits_max_abs_diff": diff, "tol": tol, "ok": ok})
            log(f"  ORT check {name}/{cname}: prompt {len(ids)} tok, image tok {ids.count(IMAGE_ID)}, "
                f"new {len(new)} eos={stopped}, ids_equal={o_new == new}, max|dlogit|={diff:.2e} "
                f"(tol {tol:.2e}) {'OK' if ok else 'MISMATCH'}")
    return {"model": f"models/{name}", "max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID, "do_sample": False, "budgets": BUDGETS,
            "first_logits_rounding": "6 significant digits", "cases": cases}, report


def main():
    global FIX
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-data", default=os.environ.get("LFM_REFERENCE_DATA",
                                                               "/work/shared/reference/data"),
                    help="folder with the real model's tokenizer_config.json, chat_template.jinja, "
                         "preprocessor_config.json, processor_config.json")
    ap.add_argument("--skip-ort-check", action="store_true")
    ap.add_argument("--out", default=FIX, help="fixtures folder to write (default tests/fixtures)")
    ap.add_argument("--only-variants", action="store_true",
                    help="rebuild only the variant model folders (models/tiny16-gqa) from the base "
                         "model folders and goldens already under --out")
    args = ap.parse_args()
    FIX = os.path.abspath(args.out)
    torch.set_num_threads(2)
    ref = args.reference_data
    t_start = time.time()

    merges = L.learn_bpe_merges(L.training_corpus(CORPUS_SEED), NUM_MERGES)
    if args.only_variants:
        report = build_variants(merges, not args.skip_ort_check)
        bad = [r for r in report if not r["ok"]]
        if report:
            log(f"ORT variant check: {len(report) - len(bad)}/{len(report)} cases OK")
        if bad:
            log("MISMATCH:", bad)
            sys.exit(1)
        log(f"done in {time.time() - t_start:.1f}s")
        return
    gold = os.path.join(FIX, "golden")
    os.makedirs(gold, exist_ok=True)
    models = {}
    for name, spec in L.MODEL_SPECS.items():
        models[name] = make_model_dir(name, spec, merges, ref)

    img_dir = make_images()
    L.write_json(os.path.join(gold, "decode.json"), golden_decode(img_dir), indent=1)
    log("decode.json written")

    _, _, proc16 = models["tiny16"]
    L.write_json(os.path.join(gold, "chat_template.json"), golden_chat(proc16.tokenizer, ref), indent=1)
    L.write_json(os.path.join(gold, "tokenize.json"),
                 golden_tokenize(os.path.join(models["tiny16"][0], "tokenizer.json")), indent=1)
    log("chat_template.json, tokenize.json written")

    t0 = time.time()
    L.write_json(os.path.join(gold, "preprocess.json"), golden_preprocess(proc16))
    log(f"preprocess.json written ({time.time() - t0:.1f}s)")

    all_report = []
    for name, (d, model, proc) in models.items():
        g, rep = golden_generate(name, model, proc, os.path.join(d, "onnx"), not args.skip_ort_check)
        all_report += rep
        L.write_json(os.path.join(gold, f"generate_{name}.json"), g)
        write_provenance(name, L.MODEL_SPECS[name], d, model, merges)
    all_report += build_variants(merges, not args.skip_ort_check)
    if all_report:
        bad = [r for r in all_report if not r["ok"]]
        log(f"ORT export check: {len(all_report) - len(bad)}/{len(all_report)} cases OK; "
            f"max |dlogit| {max(r['first_logits_max_abs_diff'] for r in all_report):.2e}")
        if bad:
            log("MISMATCH:", bad)
            sys.exit(1)
    log(f"done in {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
