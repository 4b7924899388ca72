"""Decoding on the tiny models equals transformers: prompt ids, first-step logits and
greedy ids (repetition penalty 1.0, 1.05 and 1.5), for text-only, one-image, multi-tile,
two-image and multi-turn conversations, on two models of different widths and layer
layouts. Goldens: scripts/make_fixtures.py."""

from __future__ import annotations

import io
import shutil
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import lfm
import numpy as np
import pytest
from conftest import MODELS, PROVIDERS, golden, grad

# tiny16-gqa has tiny16's weights with the official export's attention operator
# (GroupQueryAttention fed from the mask), so tiny16's goldens apply to it.
GOLDEN_OF = {"tiny16": "tiny16", "tiny6": "tiny6", "tiny16-gqa": "tiny16"}


@cache
def engine(model: str, budget: str) -> lfm.Engine:
    budgets = golden(f"generate_{GOLDEN_OF[model]}.json")["budgets"]
    opts = lfm.EngineOptions(image_budget=lfm.ImageBudget(**budgets[budget]), intra_threads=1, providers=PROVIDERS)
    return lfm.Engine.from_dir(MODELS / model, opts)


def cases() -> list[Any]:
    return [
        pytest.param(model, case, id=f"{model}-{case['name']}")
        for model in GOLDEN_OF
        for case in golden(f"generate_{GOLDEN_OF[model]}.json")["cases"]
    ]


def images_of(case: dict[str, Any]) -> list[np.ndarray]:
    return [grad(i["width"], i["height"]) for i in case["images"]]


@pytest.mark.parametrize(("model", "case"), cases())
def test_prompt_ids(model: str, case: dict[str, Any]) -> None:
    e = engine(model, case["budget"])
    assert e.apply_chat_template(case["messages"]) == case["prompt_text"]
    assert e.encode_prompt(case["messages"], images_of(case)) == case["prompt_ids"]


@pytest.mark.parametrize(("model", "case"), cases())
def test_first_logits(model: str, case: dict[str, Any]) -> None:
    logits = engine(model, case["budget"]).next_token_logits(case["messages"], images_of(case))
    want = np.asarray(case["first_logits"], dtype=np.float32)
    assert logits.dtype == np.float32 and logits.shape == want.shape
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    assert float(np.abs(logits - want).max()) <= tol


@pytest.mark.parametrize(("model", "case"), cases())
@pytest.mark.parametrize(
    ("penalty", "key"), [(1.0, "new_ids"), (1.05, "new_ids_rep_penalty_1_05"), (1.5, "new_ids_rep_penalty_1_5")]
)
def test_greedy_ids(model: str, case: dict[str, Any], penalty: float, key: str) -> None:
    opts = lfm.RequestOptions(max_new_tokens=24, repetition_penalty=penalty)
    gen = engine(model, case["budget"]).generate(case["messages"], images_of(case), opts)
    assert list(gen.token_ids) == case[key]
    assert gen.finish_reason == ("stop" if case[f"stopped_on_eos{key[7:]}"] else "length")
    assert gen.usage == lfm.Usage(
        prompt_tokens=len(case["prompt_ids"]),
        image_tokens=case["image_token_count"],
        completion_tokens=len(case[key]),
    )
    t = gen.timings
    assert min(t.preprocess_s, t.vision_s, t.prefill_s, t.decode_s) >= 0.0
    assert (t.vision_s > 0.0) == bool(case["images"])


def test_png_bytes_and_paths_equal_pixels(tmp_path: Any) -> None:
    """Encoded images (bytes, str path, PathLike, PIL) give the same prompt and logits as
    their pixels: PNG is lossless and has no EXIF here."""
    from PIL import Image

    e = engine("tiny16", "default")
    pixels = grad(300, 400)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path = tmp_path / "grad.png"
    path.write_bytes(buf.getvalue())
    want = e.next_token_logits("Describe this image.", [pixels])
    for image in (buf.getvalue(), str(path), path, Image.open(path)):
        got = e.next_token_logits("Describe this image.", [image])
        np.testing.assert_array_equal(got, want)


def test_str_messages_are_one_user_turn() -> None:
    e = engine("tiny16", "default")
    img = grad(64, 64)
    as_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    inline = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Hi"}]}]
    want = e.encode_prompt(as_list, [img])
    assert e.encode_prompt("Hi", [img]) == want
    assert e.encode_prompt(inline) == want


def test_greedy_is_deterministic_and_text_decodes_ids() -> None:
    e = engine("tiny6", "default")
    opts = lfm.RequestOptions(max_new_tokens=12, repetition_penalty=1.0)
    a = e.generate("Tell me a story.", options=opts)
    b = e.generate("Tell me a story.", options=opts.to_dict())
    assert a.token_ids == b.token_ids and a.text == b.text
    assert len(a.token_ids) == 12 and a.finish_reason == "length"


def test_stop_string_ends_generation_without_it() -> None:
    e = engine("tiny16", "default")
    full = e.generate("Say something.", options=lfm.RequestOptions(max_new_tokens=24, repetition_penalty=1.0))
    letters = [
        i for i in range(1, len(full.text)) if full.text[i - 1 : i + 1].isalpha() and full.text[i - 1 : i + 1].isascii()
    ]
    if not letters:
        pytest.skip("the random model wrote no two ASCII letters in a row")
    stop = full.text[letters[0] - 1 : letters[0] + 1]
    gen = e.generate(
        "Say something.", options=lfm.RequestOptions(max_new_tokens=24, repetition_penalty=1.0, stop=(stop,))
    )
    assert gen.finish_reason == "stop"
    assert gen.text == full.text[: full.text.find(stop)]
    assert stop not in gen.text


def test_timeout_cancels_with_partial_output() -> None:
    e = engine("tiny16", "default")
    gen = e.generate("Hello", options=lfm.RequestOptions(max_new_tokens=64, timeout_s=1e-9))
    assert gen.finish_reason == "cancelled"
    assert len(gen.token_ids) < 64


def test_widths_are_read_from_the_graphs() -> None:
    a, b = engine("tiny16", "default").spec, engine("tiny6", "default").spec
    assert (a["hidden"], a["vocab"], a["num_layers"], a["kv_heads"], a["head_dim"]) == (64, 1024, 16, 2, 16)
    assert (b["hidden"], b["vocab"], b["num_layers"], b["kv_heads"], b["head_dim"]) == (96, 896, 6, 1, 24)
    assert b["layer_types"] == ["conv", "conv", "attention", "conv", "attention", "conv"]


@pytest.mark.parametrize("model", ["tiny16", "tiny6", "tiny16-gqa"])
@pytest.mark.parametrize(
    ("switch", "tolerance"),
    [
        # The decoder's position-wise tail (the last layer's feed-forward block to the LM
        # head) moved behind a slice of the last position (the prompt's other logits are
        # never used); matrix kernels may sum a single row in another order.
        ("LFM_NO_LOGITS_SLICE", 1e-5),
        # The operators feeding only the last (convolution) layer run on its window of the
        # last positions; the same rows of the same products.
        ("LFM_NO_PREFILL_WINDOW", 1e-5),
        # The vision encoder's attention and GELU fused into ONNX Runtime's kernels
        # (different summation order, hence a float32 rounding-level tolerance).
        ("LFM_NO_VISION_FUSION", 1e-4),
    ],
)
def test_graph_rewrites_change_nothing(switch: str, tolerance: float, model: str) -> None:
    """Each load-time rewrite of the graphs gives the results of the unmodified graphs."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys, numpy as np, lfm\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import grad\n"
        f"e = lfm.Engine.from_dir({str(MODELS / model)!r})\n"
        "imgs = [grad(300, 400), grad(1100, 700)]\n"
        "l = e.next_token_logits('Describe these images.', imgs)\n"
        "g = e.generate('Describe these images.', imgs, {'max_new_tokens': 12})\n"
        "s = e.spec\n"
        "print(json.dumps([l.tolist(), list(g.token_ids), s['vision_attention'], s['last_position_ops'],"
        " s['prefill_window_ops']]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LFM_NO_")}
    root = str(MODELS.parents[2])

    def run(env: dict[str, str]) -> list[Any]:
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    a, b = run(env), run(dict(env, **{switch: "1"}))
    assert (a[2], b[2]) == ("fused", "fused" if switch != "LFM_NO_VISION_FUSION" else "as_exported")
    # The LM head, the final norm and at least the last feed-forward block (~20 operators).
    assert a[3] > 20 and (b[3] == 0) == (switch == "LFM_NO_LOGITS_SLICE")
    # The attention layer's output projection, feed-forward block, norms and sums, and the
    # convolution's input projection (~28 operators).
    assert a[4] > 15 and (b[4] == 0) == (switch in ("LFM_NO_LOGITS_SLICE", "LFM_NO_PREFILL_WINDOW"))
    assert a[1] == b[1]
    diff = max(abs(x - y) for x, y in zip(a[0], b[0]))
    print(f"{model} {switch}: max |logit difference| {diff:.3g}")
    assert diff <= tolerance * max(1.0, max(map(abs, b[0])))


def test_tail_stops_at_values_needed_elsewhere(tmp_path: Path) -> None:
    """A value the graph also returns keeps every position: with the last layer's output
    made a graph output, only the final norm and the LM head run on the last position."""
    onnx = pytest.importorskip("onnx")
    shutil.copytree(MODELS / "tiny16-gqa", tmp_path / "m")
    path = tmp_path / "m" / "onnx" / "decoder_model_merged.onnx"
    m = onnx.load(path)
    # The exporter's final norm starts with this Cast; its input is the last layer's output.
    norm_in = next(n for n in m.graph.node if n.output[0] == "/embedding_norm/Cast_output_0").input[0]
    m.graph.output.append(onnx.helper.make_tensor_value_info(norm_in, onnx.TensorProto.FLOAT, None))
    onnx.save(m, path)
    opts = lfm.EngineOptions(intra_threads=1, providers=PROVIDERS)
    e, base = lfm.Engine.from_dir(tmp_path / "m", opts), lfm.Engine.from_dir(MODELS / "tiny16-gqa", opts)
    # Final norm (10 operators as exported, its weight's Identity included) and the head.
    assert (e.spec["last_position_ops"], base.spec["last_position_ops"]) == (11, 30)
    prompt = "Tell me a story about a cat. " * 10
    got, want = e.next_token_logits(prompt), base.next_token_logits(prompt)
    # As in test_graph_rewrites_change_nothing: one row may be summed in another order.
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_window_falls_back_when_the_last_layer_reads_further(tmp_path: Path, monkeypatch: Any) -> None:
    """The prefill window assumes the last (convolution) layer reads only the last few
    positions of its input; the check at load catches a graph where it does not (here
    the layer's input gains its mean over the call's positions, which is not causal
    either, so the in-place prefill check objects too) and runs every position."""
    onnx = pytest.importorskip("onnx")
    shutil.copytree(MODELS / "tiny16-gqa", tmp_path / "m")
    path = tmp_path / "m" / "onnx" / "decoder_model_merged.onnx"
    m = onnx.load(path)
    nodes = list(m.graph.node)
    # The last convolution block starts with a Transpose of its input projection.
    t = max(i for i, n in enumerate(nodes) if n.op_type == "Transpose" and "in_proj" in n.input[0])
    x = nodes[t].input[0]
    axes = onnx.helper.make_tensor("lfm_test_axes", onnx.TensorProto.INT64, [1], [1])
    m.graph.initializer.append(axes)
    mean = onnx.helper.make_node("ReduceMean", [x, "lfm_test_axes"], ["lfm_test_mean"], keepdims=1)
    add = onnx.helper.make_node("Add", [x, "lfm_test_mean"], ["lfm_test_sum"])
    nodes[t].input[0] = "lfm_test_sum"
    del m.graph.node[:]
    m.graph.node.extend(nodes[:t] + [mean, add] + nodes[t:])
    onnx.save(m, path)
    opts = lfm.EngineOptions(intra_threads=1, providers=PROVIDERS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = lfm.Engine.from_dir(tmp_path / "m", opts)
    said = [str(w.message) for w in caught if issubclass(w.category, lfm.LfmWarning)]
    assert any(m.startswith("prompts run every position through the last layers") for m in said), said
    assert (e.spec["prefill_window_ops"], e.spec["last_position_ops"]) == (0, 30)
    monkeypatch.setenv("LFM_NO_PREFILL_WINDOW", "1")
    with pytest.warns(lfm.LfmWarning, match="in-place cache"):
        whole = lfm.Engine.from_dir(tmp_path / "m", opts)
    assert whole.spec["prefill_window_ops"] == 0
    prompt = "Tell me a story about a cat. " * 10
    got, want = e.next_token_logits(prompt), whole.next_token_logits(prompt)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
