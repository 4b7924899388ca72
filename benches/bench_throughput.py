"""Captioning throughput at the real LFM2.5-VL-450M size: lfm against the plain ONNX Runtime loop
and transformers, side by side, on the same graphs, weights and images.

    /work/venvs/dev/bin/python benches/bench_throughput.py [MODEL_DIR] [--images 32] [--new-tokens 64]
        [--threads 2] [--systems a,b,...] [--ref-python /work/venvs/ref/bin/python]

MODEL_DIR defaults to bench-models/real (scripts/make_bench_model.py; the decoder must be the
GroupQueryAttention export, the default there, for lfm to batch decoder steps). The fp32 graphs
are used everywhere. ``--images`` JPEG files (640x480, 1024x768, 300x400, 1920x1080 in turn:
gradients, shapes and noise, seeded) are written to a temporary folder; every system captions the
same files with the same prompt, greedy, ``repetition_penalty=1.0``, exactly ``--new-tokens`` new
tokens (``min_new_tokens = max_new_tokens``; the plain loop masks EOS until then, as transformers'
min_new_tokens does). Systems, each in its own subprocess (so peak RSS is per system):

  lfm           (1)  lfm.Engine.generate, one request at a time
  lfm-batch     (2)  lfm, all requests submitted at once (engine.stream per request), continuous
                     batching of decoder steps, max_batch_size 8
  plain         (3)  the loop a user writes from LiquidAI's ONNX model card: three
                     onnxruntime.InferenceSession, transformers' AutoProcessor for the chat
                     template and pixels, numpy caches, one session.run per step, greedy
                     (runs in the reference venv)
  hf            (4)  transformers Lfm2VlForConditionalGeneration (bench-models/real/hf, fp32,
                     CPU, torch threads = --threads), generate(), one image at a time
  *-single           the same with lfm.ImageBudget.single_tile() (for plain/hf: the processor
                     kwargs min_tiles=max_tiles=1, use_thumbnail=False, 64 image tokens)
  preproc-lfm / preproc-hf   lfm.preproc.Preprocessor().preprocess vs transformers'
                     Lfm2VlImageProcessor on the same images (decoded arrays / PIL images; and
                     from the file, decode included); median of 3 per image, mean over images
  lfm-q8        (1q) lfm one at a time with variant="q8" (the int8 decoder and vision graphs of
                     make_bench_model.py --int8); only when named in --systems

Every system first runs one warm-up request on another image (lfm-batch: two at once, so the
one-time check of the first batched step is not in the job). Measured per system:

  images/s      N / wall time of the job (model load and warm-up excluded)
  TTFT          median over images of the time from a request's submission to its first token
                (lfm: wall - timings.decode_s; plain/hf: time of the first token; lfm-batch: from
                the job's start to the request's first text piece, so it includes queueing)
  decode tok/s  decode tokens (all but the first, which comes from prefill) / time in decode
                steps: for lfm, job wall - sum(preprocess + vision + prefill) (the scheduler
                runs everything on one thread, so for lfm-batch this is the aggregate batched
                rate); for plain/hf the timed decode loops
  peak RSS      ru_maxrss of the system's subprocess
  ORT ms/step   (plain) time inside the decoder's session.run per decode step

Engine overhead at batch 1 = lfm's decode wall per step (timings.decode_s / (n - 1)) / the
plain loop's time inside decoder session.run per step for the same image (same prompt length,
so the same cache sizes; same onnxruntime version and thread count): lfm has no timer of its own
ORT-only time. Median over images.

A system run during which other processes used more than --max-foreign cores on average
(/proc/stat busy jiffies minus this process's and the child's) is redone, after waiting for the
machine to be quiet. Writes the tables to stdout and to --out (benches/results/throughput.md)
and the raw numbers next to it (throughput.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _machine import cpu_name, cpu_reading, foreign_cores  # noqa: E402

ROOT = os.path.dirname(HERE)
PROMPT = "Write a one-sentence caption for this image."
SIZES = [(640, 480), (1024, 768), (300, 400), (1920, 1080)]
WARMUP_SIZE = (320, 240)
SINGLE_TILE_KW = dict(min_image_tokens=64, max_image_tokens=64, min_tiles=1, max_tiles=1, use_thumbnail=False)
GRAPHS = ["vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"]

# name: (interpreter, worker, budget, label, variant of lfm's graphs)
SYSTEMS = {
    "preproc-lfm": ("dev", "preproc-lfm", None, "lfm.preproc.Preprocessor", "fp32"),
    "preproc-hf": ("ref", "preproc-hf", None, "transformers Lfm2VlImageProcessor", "fp32"),
    "lfm": ("dev", "lfm-b1", "default", "(1) lfm, one at a time", "fp32"),
    "lfm-batch": ("dev", "lfm-batch", "default", "(2) lfm, batched", "fp32"),
    "plain": ("ref", "plain", "default", "(3) plain ORT loop (model card)", "fp32"),
    "hf": ("ref", "hf", "default", "(4) transformers", "fp32"),
    "lfm-single": ("dev", "lfm-b1", "single", "(1b) lfm, one at a time, single_tile()", "fp32"),
    "lfm-batch-single": ("dev", "lfm-batch", "single", "(2b) lfm, batched, single_tile()", "fp32"),
    "plain-single": ("ref", "plain", "single", "(3b) plain ORT loop, single tile", "fp32"),
    "hf-single": ("ref", "hf", "single", "(4b) transformers, single tile", "fp32"),
    # Not part of the default run: the int8 graphs (`make_bench_model.py --int8`), for the
    # speed a user gets from `variant="q8"`; their token ids differ from the fp32 systems'.
    "lfm-q8": ("dev", "lfm-b1", "default", "(1q) lfm, one at a time, variant='q8'", "q8"),
}


# ======================================================================================
# helpers shared by parent and workers
# ======================================================================================


def _now() -> float:
    return time.perf_counter()


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def wait_quiet(max_foreign: float, max_wait_s: float, sample_s: float = 5.0, pause_s: float = 20.0) -> float:
    """Waits (up to max_wait_s) until other processes use under max_foreign cores over
    sample_s seconds. Returns the last reading."""
    t_end = time.time() + max_wait_s
    while True:
        r0 = cpu_reading()
        time.sleep(sample_s)
        foreign = foreign_cores(r0, cpu_reading(), sample_s)
        if foreign <= max_foreign or time.time() > t_end:
            return foreign
        print(f"  waiting: other processes use {foreign:.2f} cores (load average {os.getloadavg()[0]:.2f})", flush=True)
        time.sleep(pause_s)


def clean_run(fn, job: dict, label: str):
    """Runs fn() (one request of a one-at-a-time system) until other processes used at most
    job["max_foreign"] cores during it (at most job["max_retries"] redos), first waiting for a
    quiet second. Returns (fn's result, wall s, foreign cores, attempts)."""
    attempt = 0
    while True:
        attempt += 1
        wait_quiet(job["max_foreign"], job["max_wait"], sample_s=1.0, pause_s=5.0)
        r0, t0 = cpu_reading(), _now()
        r = fn()
        wall = _now() - t0
        foreign = foreign_cores(r0, cpu_reading(), wall)
        if foreign <= job["max_foreign"] or attempt > job["max_retries"]:
            return r, wall, foreign, attempt
        print(f"    redo {label}: other processes used {foreign:.2f} cores", flush=True)


def caption_one_at_a_time(caption, job: dict) -> dict:
    """The job for a one-at-a-time peer: caption(path, min_new, max_new) -> record, after a
    warm-up, each file under clean_run. Returns job_s, recs, rss_before_job_mb, decode_tok_s."""
    caption(job["warmup"], 4, 4)
    rss_before = _rss_mb()
    n = job["new_tokens"]
    recs = []
    job_s = 0.0
    for f in job["files"]:
        r, wall, foreign, attempts = clean_run(lambda f=f: caption(f, n, n), job, os.path.basename(f))
        job_s += wall
        r.update(foreign_cores=foreign, attempts=attempts)
        recs.append(r)
        ort_step = f"ORT {1000 * r['ort_step_s']:.1f} ms/step, " if "ort_step_s" in r else ""
        print(f"    {r['file']:22s} {r['prompt_tokens']:5d} prompt tok, TTFT {r['ttft_s']:6.2f}s, decode {r['decode_s']:6.2f}s, "
              f"{ort_step}other processes {foreign:.2f} cores", flush=True)
    dec = sum(r["decode_s"] for r in recs)
    return {"job_s": job_s, "recs": recs, "rss_before_job_mb": rss_before,
            "decode_tok_s": sum(r["completion_tokens"] - 1 for r in recs) / max(dec, 1e-9)}


def make_image(width: int, height: int, seed: int):
    """A photo-like uint8 RGB array: smooth gradients, a few soft shapes, sensor-like noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    img = (c0[None, None] * (1 - u)[..., None] + c1[None, None] * u[..., None]) * (1 - v)[..., None] \
        + c2[None, None] * v[..., None]
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        a = np.clip((r - d) / (0.1 * r), 0, 1)[..., None]
        img = img * (1 - 0.7 * a) + 0.7 * a * rng.uniform(0, 255, 3)[None, None]
    img += 8 * np.sin(u * rng.uniform(5, 40))[..., None] * np.cos(v * rng.uniform(5, 40))[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: str, n: int) -> tuple[list[str], str]:
    from PIL import Image

    files = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        p = os.path.join(folder, f"img{i:03d}_{w}x{h}.jpg")
        Image.fromarray(make_image(w, h, 1000 + i)).save(p, quality=90)
        files.append(p)
    w, h = WARMUP_SIZE
    warm = os.path.join(folder, f"warmup_{w}x{h}.jpg")
    Image.fromarray(make_image(w, h, 999)).save(warm, quality=90)
    return files, warm


# ======================================================================================
# workers (each runs in its own process)
# ======================================================================================


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_lfm(job: dict, batched: bool) -> dict:
    import threading
    import warnings

    import lfm

    budget = lfm.ImageBudget.single_tile() if job["budget"] == "single" else lfm.ImageBudget()
    t0 = _now()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eopts = lfm.EngineOptions(intra_threads=job["threads"], image_budget=budget, max_batch_size=8,
                                  variant=job["variant"])
        try:  # the bench model's synthetic tokenizer is not the real one lfm bundles
            engine = lfm.Engine.from_dir(job["model_dir"], eopts, strict=False)
        except TypeError:  # an lfm without the strict check
            engine = lfm.Engine.from_dir(job["model_dir"], eopts)
        load_s = _now() - t0
        n = job["new_tokens"]
        opts = lfm.RequestOptions(max_new_tokens=n, min_new_tokens=n, repetition_penalty=1.0)
        warm = lfm.RequestOptions(max_new_tokens=4, min_new_tokens=4, repetition_penalty=1.0)
        files = job["files"]
        recs = []
        if not batched:
            engine.generate(PROMPT, images=[job["warmup"]], options=warm)
            rss_before = _rss_mb()
            job_s = 0.0
            for f in files:
                g, wall, foreign, attempts = clean_run(
                    lambda f=f: engine.generate(PROMPT, images=[f], options=opts), job, os.path.basename(f))
                job_s += wall
                recs.append(_lfm_rec(f, g, wall, wall - g.timings.decode_s))
                recs[-1].update(foreign_cores=foreign, attempts=attempts)
                print(f"    {os.path.basename(f):22s} {g.usage.prompt_tokens:5d} prompt tok, TTFT {recs[-1]['ttft_s']:6.2f}s, "
                      f"decode {g.timings.decode_s:6.2f}s, other processes {foreign:.2f} cores", flush=True)
        else:
            engine.generate_batch([PROMPT, PROMPT], images=[[job["warmup"]], [job["warmup"]]], options=warm)
            rss_before = _rss_mb()
            first = [None] * len(files)
            results = [None] * len(files)
            t_job = _now()
            streams = [engine.stream(PROMPT, images=[f], options=opts) for f in files]

            def drain(i):
                s = streams[i]
                for _piece in s:
                    if first[i] is None:
                        first[i] = _now()
                results[i] = s.generation

            threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(files))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            job_s = _now() - t_job
            for i, f in enumerate(files):
                g = results[i]
                recs.append(_lfm_rec(f, g, None, (first[i] - t_job) if first[i] else None))
        stats = engine.stats
    pre = sum(r["preprocess_s"] + r["vision_s"] + r["prefill_s"] for r in recs)
    dec_tokens = sum(r["completion_tokens"] - 1 for r in recs)
    return {"load_s": load_s, "job_s": job_s, "recs": recs, "stats": stats,
            "decode_phase_s": job_s - pre, "decode_tok_s": dec_tokens / max(job_s - pre, 1e-9),
            "rss_before_job_mb": rss_before,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, lfm.LfmWarning)]}


def _lfm_rec(f, g, wall, ttft):
    t = g.timings
    n = g.usage.completion_tokens
    return {"file": os.path.basename(f), "prompt_tokens": g.usage.prompt_tokens, "image_tokens": g.usage.image_tokens,
            "completion_tokens": n, "preprocess_s": t.preprocess_s, "vision_s": t.vision_s, "prefill_s": t.prefill_s,
            "decode_s": t.decode_s, "step_s": t.decode_s / max(n - 1, 1), "wall_s": wall, "ttft_s": ttft,
            "token_ids": list(g.token_ids), "finish": g.finish_reason}


def _ref_setup(threads: int):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
    import fixture_lib

    torch = fixture_lib.import_torch()
    torch.set_num_threads(threads)
    return torch


def _messages():
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]


def worker_plain(job: dict) -> dict:
    """The model-card loop: the processor makes ids and pixels, three ORT sessions, numpy caches."""
    _ref_setup(job["threads"])
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoProcessor
    from transformers.image_utils import load_image

    kw = SINGLE_TILE_KW if job["budget"] == "single" else {}
    t0 = _now()
    onnx_dir = os.path.join(job["model_dir"], "onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = job["threads"]
    providers = ["CPUExecutionProvider"]
    vision = ort.InferenceSession(os.path.join(onnx_dir, "vision_encoder.onnx"), so, providers=providers)
    embed = ort.InferenceSession(os.path.join(onnx_dir, "embed_tokens.onnx"), so, providers=providers)
    decoder = ort.InferenceSession(os.path.join(onnx_dir, "decoder_model_merged.onnx"), so, providers=providers)
    processor = AutoProcessor.from_pretrained(job["model_dir"])
    load_s = _now() - t0
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    eos_id = processor.tokenizer.eos_token_id
    out_names = [o.name for o in decoder.get_outputs()]

    def caption(path, max_new, min_new):
        t_start = _now()
        image = load_image(path)
        text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[[image]], text=[text], return_tensors="np", **kw)
        input_ids = inputs["input_ids"]
        t_pre = _now()
        feats = vision.run(None, {"pixel_values": inputs["pixel_values"].astype(np.float32),
                                  "pixel_attention_mask": inputs["pixel_attention_mask"].astype(np.int64),
                                  "spatial_shapes": inputs["spatial_shapes"].astype(np.int64)})[0]
        embeds = embed.run(None, {"input_ids": input_ids})[0]
        embeds[0, input_ids[0] == image_token_id] = feats
        t_vis = _now()
        past = {}
        for i in decoder.get_inputs()[2:]:
            if i.name.startswith("past_conv"):
                past[i.name] = np.zeros([1, i.shape[1], i.shape[2]], np.float32)
            else:
                past[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
        mask = np.ones_like(input_ids)
        generated, run_s, t_first = [], [], None
        for step in range(max_new):
            t = _now()
            outs = decoder.run(None, {"inputs_embeds": embeds, "attention_mask": mask, **past})
            run_s.append(_now() - t)
            logits = outs[0][0, -1]
            if step < min_new:
                logits[eos_id] = -np.inf
            nxt = int(np.argmax(logits))
            if t_first is None:
                t_first = _now()
            if nxt == eos_id:
                break
            generated.append(nxt)
            for name, v in zip(out_names[1:], outs[1:]):
                past[name.replace("present_conv", "past_conv").replace("present.", "past_key_values.")] = v
            embeds = embed.run(None, {"input_ids": np.array([[nxt]], np.int64)})[0]
            mask = np.concatenate([mask, np.ones((1, 1), mask.dtype)], axis=1)
        t_end = _now()
        n = len(generated)
        return {"file": os.path.basename(path), "prompt_tokens": int(input_ids.shape[1]),
                "image_tokens": int((input_ids[0] == image_token_id).sum()), "completion_tokens": n,
                "preprocess_s": t_pre - t_start, "vision_s": t_vis - t_pre, "prefill_s": run_s[0],
                "ttft_s": t_first - t_start, "decode_s": t_end - t_first, "step_s": (t_end - t_first) / max(n - 1, 1),
                "ort_step_s": sum(run_s[1:n]) / max(n - 1, 1), "wall_s": t_end - t_start, "token_ids": generated}

    return {"load_s": load_s, **caption_one_at_a_time(caption, job),
            "versions": {"onnxruntime": ort.__version__}}


def worker_hf(job: dict) -> dict:
    torch = _ref_setup(job["threads"])
    import transformers
    from transformers import AutoProcessor, Lfm2VlForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer
    from transformers.image_utils import load_image

    kw = SINGLE_TILE_KW if job["budget"] == "single" else {}
    hf_dir = os.path.join(job["model_dir"], "hf")
    t0 = _now()
    model = Lfm2VlForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)
    load_s = _now() - t0
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")

    class Times(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(_now())

        def end(self):
            pass

    def caption(path, max_new, min_new):
        t_start = _now()
        image = load_image(path)
        text = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[[image]], text=[text], return_tensors="pt", **kw)
        t_pre = _now()
        st = Times()
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new, min_new_tokens=min_new,
                                 repetition_penalty=1.0, streamer=st)
        t_end = _now()
        ids = inputs["input_ids"][0]
        new = out[0, ids.shape[0]:].tolist()
        eos = processor.tokenizer.eos_token_id
        new = new[:new.index(eos)] if eos in new else new
        n = len(new)
        t_first = st.t[1]  # put #0 is the prompt
        return {"file": os.path.basename(path), "prompt_tokens": int(ids.shape[0]),
                "image_tokens": int((ids == image_token_id).sum()), "completion_tokens": n,
                "preprocess_s": t_pre - t_start, "vision_s": None, "prefill_s": t_first - t_pre,
                "ttft_s": t_first - t_start, "decode_s": st.t[-1] - t_first,
                "step_s": (st.t[-1] - t_first) / max(n - 1, 1), "wall_s": t_end - t_start, "token_ids": new}

    return {"load_s": load_s, **caption_one_at_a_time(caption, job),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def worker_preproc_lfm(job: dict) -> dict:
    import lfm
    from lfm import preproc

    out = {}
    for bname, budget in [("default", lfm.ImageBudget()), ("single", lfm.ImageBudget.single_tile())]:
        p = preproc.Preprocessor(budget)
        arrays = [preproc.decode(f) for f in job["files"]]
        p.preprocess(preproc.decode(job["warmup"]))
        per_arr, per_file = [], []
        for f, a in zip(job["files"], arrays):
            ts, tf = [], []
            for _ in range(job["repeats"]):
                t = _now()
                p.preprocess(a)
                ts.append(_now() - t)
                t = _now()
                p.preprocess(f)
                tf.append(_now() - t)
            per_arr.append(statistics.median(ts))
            per_file.append(statistics.median(tf))
        out[bname] = {"array_ms": [1000 * x for x in per_arr], "file_ms": [1000 * x for x in per_file]}
    return out


def worker_preproc_hf(job: dict) -> dict:
    _ref_setup(job["threads"])
    from transformers import Lfm2VlImageProcessor
    from transformers.image_utils import load_image

    ip = Lfm2VlImageProcessor.from_pretrained(job["model_dir"])
    out = {"class": type(ip).__name__}
    for bname, kw in [("default", {}), ("single", SINGLE_TILE_KW)]:
        images = [load_image(f) for f in job["files"]]
        ip(images=[[load_image(job["warmup"])]], return_tensors="pt", **kw)
        per_arr, per_file = [], []
        for f, im in zip(job["files"], images):
            ts, tf = [], []
            for _ in range(job["repeats"]):
                t = _now()
                ip(images=[[im]], return_tensors="pt", **kw)
                ts.append(_now() - t)
                t = _now()
                ip(images=[[load_image(f)]], return_tensors="pt", **kw)
                tf.append(_now() - t)
            per_arr.append(statistics.median(ts))
            per_file.append(statistics.median(tf))
        out[bname] = {"array_ms": [1000 * x for x in per_arr], "file_ms": [1000 * x for x in per_file]}
    return out


def _env_info(worker: str) -> dict:
    """Versions the worker ran with (lfm is rebuilt often: its version and build time)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("lfm", "onnxruntime", "numpy", "torch", "transformers"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    if worker.startswith(("lfm", "preproc-lfm")):
        import glob

        import lfm

        libs = glob.glob(os.path.join(os.path.dirname(lfm.__file__), "_lfm*.so"))
        if libs:
            out["lfm_build_time"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(libs[0])))
    return out


def run_worker(args) -> None:
    with open(args.job) as f:
        job = json.load(f)
    w = job["worker"]
    env = _env_info(w)  # before the work: the lfm build that is loaded, not one installed meanwhile
    if w == "lfm-b1":
        res = worker_lfm(job, batched=False)
    elif w == "lfm-batch":
        res = worker_lfm(job, batched=True)
    elif w == "plain":
        res = worker_plain(job)
    elif w == "hf":
        res = worker_hf(job)
    elif w == "preproc-lfm":
        res = worker_preproc_lfm(job)
    elif w == "preproc-hf":
        res = worker_preproc_hf(job)
    else:
        raise SystemExit(f"unknown worker {w}")
    res["env"] = env
    with open(args.result, "w") as f:
        json.dump(res, f)


# ======================================================================================
# parent
# ======================================================================================


def run_system(name: str, args, files, warm, tmp) -> dict:
    venv, worker, budget, _label, variant = SYSTEMS[name]
    py = sys.executable if venv == "dev" else args.ref_python
    job = {"worker": worker, "budget": budget, "variant": variant, "model_dir": args.model_dir, "files": files,
           "warmup": warm,
           "new_tokens": args.new_tokens, "threads": args.threads, "repeats": 3,
           "max_foreign": args.max_foreign, "max_retries": args.max_retries, "max_wait": args.max_wait}
    per_request = worker in ("lfm-b1", "plain", "hf")  # these redo contaminated requests themselves
    jp, rp = os.path.join(tmp, f"{name}.job.json"), os.path.join(tmp, f"{name}.result.json")
    with open(jp, "w") as f:
        json.dump(job, f)
    attempt = 0
    while True:
        attempt += 1
        quiet = 0.0 if per_request else wait_quiet(args.max_foreign, args.max_wait)
        print(f"[{name}] {SYSTEMS[name][3]} (attempt {attempt}; other processes {quiet:.2f} cores, "
              f"load average {os.getloadavg()[0]:.2f})", flush=True)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
        r0, t0 = cpu_reading(), _now()
        p = subprocess.Popen([py, os.path.abspath(__file__), "--worker", "--job", jp, "--result", rp], env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = _now() - t0
        r1 = cpu_reading()
        if p.returncode != 0:
            raise SystemExit(f"[{name}] worker failed with exit code {p.returncode}")
        child_cpu = ru.ru_utime + ru.ru_stime
        foreign = foreign_cores(r0, r1, wall, children_s=child_cpu)
        with open(rp) as f:
            res = json.load(f)
        res.update(peak_rss_mb=ru.ru_maxrss / 1024, process_wall_s=wall, child_cpu_s=child_cpu,
                   foreign_cores=foreign, attempts=attempt, load_avg_after=os.getloadavg()[0])
        print(f"[{name}] done in {wall:.0f}s, peak RSS {res['peak_rss_mb']:.0f} MB, CPU {child_cpu:.0f}s, "
              f"other processes {foreign:.2f} cores", flush=True)
        res["redos"] = attempt - 1
        if per_request:
            res["foreign_cores_process"] = foreign
            res["foreign_cores"] = max(r["foreign_cores"] for r in res["recs"])
            res["redos"] = sum(r["attempts"] - 1 for r in res["recs"])
        if per_request or foreign <= args.max_foreign or attempt > args.max_retries:
            return res
        print(f"[{name}] redo: other processes used {foreign:.2f} cores during the run", flush=True)


def fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def report(args, res: dict, files: list[str], graph_bytes: int, load0: float, load1: float) -> tuple[str, dict]:
    n = len(files)
    verdicts = {}
    runs = {k: v for k, v in res.items() if not k.startswith("preproc")}

    def metrics(name):
        r = res[name]
        recs = r["recs"]
        return {"ips": n / r["job_s"], "ttft": _median(x["ttft_s"] for x in recs), "dec": r["decode_tok_s"],
                "rss": r["peak_rss_mb"], "job_s": r["job_s"], "load_s": r["load_s"],
                "ort_step_ms": _median(1000 * x["ort_step_s"] for x in recs) if name.startswith("plain") else None,
                "step_ms": _median(1000 * x["step_s"] for x in recs if x.get("step_s") is not None)
                if not name.startswith("lfm-batch") else None}

    m = {k: metrics(k) for k in runs}
    lines = [
        "# Captioning throughput: lfm vs the plain ONNX Runtime loop vs transformers",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {_mem_gb():.0f} GiB; {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}; `--threads {args.threads}` everywhere (ORT intra-op threads, torch threads)",
        f"- load (other sessions share this machine): 1-minute load average {load0:.2f} before / {load1:.2f} after; "
        f"a request of a one-at-a-time system, or a whole batched/preprocessing run, during which other processes used "
        f"> {args.max_foreign} cores on average is redone (after waiting for a quiet moment); CPU cores used by other "
        "processes during the kept measurements (max per request for one-at-a-time systems), and redos: "
        + ", ".join(f"{k} {v['foreign_cores']:.2f} ({v['redos']} redone)" for k, v in res.items()),
        "- versions: " + _versions_line(res),
        f"- model: random-weight LFM2.5-VL-450M at the real size, fp32 graphs ({graph_bytes / 1e9:.2f} GB: vision "
        "encoder, embed_tokens, GroupQueryAttention decoder), `scripts/make_bench_model.py`; transformers loads the "
        "same weights from `hf/`",
        f"- job: {n} JPEG images ({', '.join(f'{w}x{h}' for w, h in SIZES)} in turn), prompt `{PROMPT}`, greedy, "
        f"`repetition_penalty=1.0`, exactly {args.new_tokens} new tokens (`min_new_tokens = max_new_tokens`)",
        f"- reproduce: `/work/venvs/ref/bin/python scripts/make_bench_model.py --int8 && "
        f"/work/venvs/dev/bin/python benches/bench_throughput.py --images {n} --new-tokens {args.new_tokens}`",
        "",
        "| system | images/s | job s | TTFT median s | decode tok/s | ms / step (b1) | peak RSS MB | images/s vs (3) | vs (4) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in m.items():
        single = name.endswith("single")
        p3, p4 = ("plain-single", "hf-single") if single else ("plain", "hf")
        r3 = ratio(v["ips"], m[p3]["ips"]) if p3 in m else None
        r4 = ratio(v["ips"], m[p4]["ips"]) if p4 in m else None
        lines.append(f"| {SYSTEMS[name][3]} | {v['ips']:.3f} | {v['job_s']:.1f} | {fmt(v['ttft'])} | {v['dec']:.1f} | "
                     f"{fmt(v['step_ms'], '.1f')} | {v['rss']:.0f} | {fmt(r3, '.2f')}{'x' if r3 else ''} | {fmt(r4, '.2f')}{'x' if r4 else ''} |")
    lines += ["", "TTFT of the batched rows runs from the job's start (queueing included). decode tok/s: batched rows "
              "give the aggregate rate over the job's decode steps; b1 rows the per-sequence rate. "
              "ms / step: median decode wall per step (b1 systems)."]

    # agreement
    lines += ["", "## Same output?", ""]
    for base, others in [("lfm", ["lfm-batch", "plain", "hf"]), ("lfm-single", ["lfm-batch-single", "plain-single", "hf-single"])]:
        if base not in res:
            continue
        b = {x["file"]: x for x in res[base]["recs"]}
        parts = []
        for o in others:
            if o not in res:
                continue
            same_ids = sum(x["token_ids"] == b[x["file"]]["token_ids"] for x in res[o]["recs"])
            same_prompt = sum(x["prompt_tokens"] == b[x["file"]]["prompt_tokens"] for x in res[o]["recs"])
            parts.append(f"{o}: {same_ids}/{n} identical token ids, {same_prompt}/{n} equal prompt lengths")
        lines.append(f"- vs {base}: " + "; ".join(parts))
    for k in ("lfm-batch", "lfm-batch-single"):
        if k in res:
            st = res[k]["stats"]
            lines.append(f"- {k}: scheduler {st}, mean batch {st['sequence_steps'] / max(st['decoder_steps'], 1):.2f}, "
                         f"warnings {res[k]['warnings'] or 'none'}")

    # preprocessing
    if "preproc-lfm" in res and "preproc-hf" in res:
        lines += ["", "## Preprocessing (per image, mean over the job's images)", "",
                  "| budget | lfm ms (array) | transformers ms (PIL) | speed-up | lfm ms (from file) | transformers ms (from file) | speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for bname in ("default", "single"):
            a, h = res["preproc-lfm"][bname], res["preproc-hf"][bname]
            la, ha = statistics.mean(a["array_ms"]), statistics.mean(h["array_ms"])
            lf, hf_ = statistics.mean(a["file_ms"]), statistics.mean(h["file_ms"])
            lines.append(f"| {bname} | {la:.1f} | {ha:.1f} | {ha / la:.1f}x | {lf:.1f} | {hf_:.1f} | {hf_ / lf:.1f}x |")
            verdicts.setdefault("preproc", (ha / la, hf_ / lf)) if bname == "default" else None
        lines.append(f"\ntransformers' processor class: `{res['preproc-hf'].get('class')}`; lfm figures from "
                     "`Preprocessor(budget).preprocess(array)` and `.preprocess(path)`; transformers' from "
                     "`processor(images=[[pil]], return_tensors='pt')` and with `load_image(path)` first.")

    # engine overhead
    if "lfm" in res and "plain" in res:
        lines += ["", "## Engine overhead at batch 1", ""]
        for a, b in [("lfm", "plain"), ("lfm-single", "plain-single")]:
            if a not in res or b not in res:
                continue
            pb = {x["file"]: x for x in res[b]["recs"]}
            ov = [x["step_s"] / pb[x["file"]]["ort_step_s"] for x in res[a]["recs"]]
            own = [x["step_s"] / x["ort_step_s"] for x in res[b]["recs"]]
            lines.append(f"- {a}: decode wall per step / plain loop's time inside decoder `session.run` per step "
                         f"(same image, same cache sizes): median {statistics.median(ov):.3f} "
                         f"(min {min(ov):.3f}, max {max(ov):.3f}); lfm {m[a]['step_ms']:.1f} ms/step, "
                         f"ORT {m[b]['ort_step_ms']:.1f} ms/step; the plain loop's own wall/ORT: "
                         f"{statistics.median(own):.3f}")
            verdicts.setdefault("overhead", statistics.median(ov))

    # targets
    lines += ["", "## Targets (fp32 graphs, this machine)", ""]

    def t(label, value, target, ok, note=""):
        if value is None:
            lines.append(f"- {label}: not measured")
            return
        lines.append(f"- {label}: {value} — target {target}: **{'met' if ok else 'NOT met'}**{note}")

    if "overhead" in verdicts:
        o = verdicts["overhead"]
        t("engine overhead at batch 1 (lfm decode wall / ORT decoder time)", f"{o:.3f}", "≤ 1.05", o <= 1.05,
          f" ({100 * (o - 1):+.1f}%)")
    if "lfm" in m and "hf" in m:
        r = m["lfm"]["ips"] / m["hf"]["ips"]
        t("one-at-a-time lfm images/s vs transformers", f"{r:.2f}x", "≥ 1.2x", r >= 1.2)
    for b1, bb in [("lfm-single", "lfm-batch-single"), ("lfm", "lfm-batch")]:
        if b1 in m and bb in m:
            r = m[bb]["dec"] / m[b1]["dec"]
            mb = res[bb]["stats"]["sequence_steps"] / max(res[bb]["stats"]["decoder_steps"], 1)
            t(f"decode tok/s batched vs batch 1 ({'single_tile' if 'single' in b1 else 'default budget'}; "
              f"max batch {res[bb]['stats']['max_batch']}, mean {mb:.2f})",
              f"{r:.2f}x ({m[bb]['dec']:.1f} vs {m[b1]['dec']:.1f} tok/s)", "≥ 4x", r >= 4)
    if "lfm-batch" in m and "hf" in m:
        r = m["lfm-batch"]["ips"] / m["hf"]["ips"]
        t(f"{n}-image job, lfm batched (default budget) vs transformers", f"{r:.2f}x", "≥ 2x", r >= 2)
    if "lfm-batch-single" in m and "hf" in m:
        r = m["lfm-batch-single"]["ips"] / m["hf"]["ips"]
        extra = ""
        if "hf-single" in m:
            extra = f" (vs transformers also single-tile: {m['lfm-batch-single']['ips'] / m['hf-single']['ips']:.2f}x)"
        t(f"{n}-image job, lfm batched with single_tile() vs transformers (default budget)", f"{r:.2f}x", "≥ 3x", r >= 3, extra)
    if "lfm-batch" in m:
        r = m["lfm-batch"]["rss"] * 1024 ** 2 / graph_bytes
        t("peak RSS at batch 8 (lfm batched, default budget) / graph files", f"{r:.2f} ({m['lfm-batch']['rss']:.0f} MB "
          f"vs {graph_bytes / 2 ** 20:.0f} MiB)", "< 1.3", r < 1.3)
    if "preproc" in verdicts:
        a, f = verdicts["preproc"]
        t("preprocessing speed-up vs transformers' image processor (default budget, decoded images)",
          f"{a:.1f}x (from file: {f:.1f}x)", "≥ 5x", a >= 5)
    return "\n".join(lines) + "\n", m


def _versions_line(res: dict) -> str:
    env: dict = {}
    builds = set()
    for r in res.values():
        e = r.get("env", {})
        if "lfm_build_time" in e:
            builds.add(e["lfm_build_time"])
        for k, v in e.items():
            if k != "lfm_build_time":
                env.setdefault(k, v)
    parts = [f"{k} {env[k]}" for k in ("lfm", "onnxruntime", "torch", "transformers", "numpy", "python") if k in env]
    if builds:
        parts.append(f"lfm extension built {', '.join(sorted(builds))}"
                     + (" (DIFFERENT builds across systems)" if len(builds) > 1 else ""))
    return ", ".join(parts) or "not recorded"


def _mem_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 1024 ** 2
    except (OSError, ValueError, IndexError):
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=os.path.join(ROOT, "bench-models", "real"))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    default_systems = ",".join(k for k in SYSTEMS if k != "lfm-q8")
    ap.add_argument("--systems", default=default_systems, help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    ap.add_argument("--ref-python", default="/work/venvs/ref/bin/python",
                    help="interpreter with torch, transformers and onnxruntime (plain loop, transformers)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "throughput.md"))
    ap.add_argument("--max-foreign", type=float, default=0.15,
                    help="redo a system run when other processes used more than this many cores during it")
    ap.add_argument("--max-retries", type=int, default=3, help="redos allowed per system")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine before a run")
    ap.add_argument("--from-json", help="re-render the report from a throughput.json written by an earlier run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        for k, v in saved["args"].items():
            if k not in ("out", "from_json"):
                setattr(args, k, v)
        res = saved["results"]
        files = [r["file"] for r in next(v for k, v in res.items() if not k.startswith("preproc"))["recs"]]
        text, _ = report(args, res, files, saved["graph_bytes"], saved.get("load_before", float("nan")),
                         saved.get("load_after", float("nan")))
        if "total_min" in saved:
            text += f"\nTotal bench time {saved['total_min']:.1f} min.\n"
        print(text)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        return
    args.model_dir = os.path.abspath(args.model_dir)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"unknown systems {bad}; known: {list(SYSTEMS)}")
    onnx_dir = os.path.join(args.model_dir, "onnx")
    graph_bytes = sum(os.path.getsize(os.path.join(onnx_dir, g)) for g in GRAPHS) + sum(
        os.path.getsize(os.path.join(onnx_dir, g + "_data")) for g in GRAPHS if os.path.exists(os.path.join(onnx_dir, g + "_data")))
    load0 = os.getloadavg()[0]
    t_all = _now()
    with tempfile.TemporaryDirectory(prefix="lfm-bench-") as tmp:
        files, warm = write_images(tmp, args.images)
        print(f"{len(files)} images in {tmp}; model {args.model_dir} ({graph_bytes / 1e9:.2f} GB of fp32 graphs); "
              f"load average {load0:.2f}", flush=True)
        res = {}
        for s in systems:
            res[s] = run_system(s, args, files, warm, tmp)
    load1 = os.getloadavg()[0]
    text, m = report(args, res, files, graph_bytes, load0, load1)
    total_min = (_now() - t_all) / 60
    text += f"\nTotal bench time {total_min:.1f} min.\n"
    print()
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    raw = os.path.splitext(os.path.abspath(args.out))[0] + ".json"
    with open(raw, "w", encoding="utf-8") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "job", "result")},
                   "graph_bytes": graph_bytes, "load_before": load0, "load_after": load1, "total_min": total_min,
                   "metrics": m, "results": res}, f, indent=1)
    print(f"written {args.out} and {raw}", file=sys.stderr)


if __name__ == "__main__":
    main()
