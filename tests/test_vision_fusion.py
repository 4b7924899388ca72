"""The vision encoder's fused attention (see rust/lfm-core/src/runtime/vision_fusion.rs)
drops only a padding mask: an attention whose scores get anything else added keeps its
exported form, and the engine's results stay those of the unmodified graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import lfm
import numpy as np
import onnx
import pytest
from conftest import MODELS, grad
from onnx import helper, numpy_helper


def with_learned_attention_bias(dst: Path) -> None:
    """tiny16 whose first attention adds a bias computed from the hidden states (a
    MatMul by a weight) to the padding mask: that Add must not be dropped."""
    shutil.copytree(MODELS / "tiny16", dst)
    path = dst / "onnx" / "vision_encoder.onnx"
    m = onnx.load(path)
    g = m.graph
    sm = next(n for n in g.node if n.op_type == "Softmax")
    add = next(n for n in g.node if sm.input[0] in n.output)
    mul = next(n for n in g.node if n.op_type == "Mul" and n.output[0] in add.input)
    mask = next(i for i in add.input if i != mul.output[0])
    ln = next(n for n in g.node if n.op_type == "LayerNormalization")
    hidden = next(t for t in g.initializer if t.name == ln.input[1]).dims[0]
    w = np.random.default_rng(0).normal(0, 3, (hidden, 1)).astype(np.float32)
    g.initializer.extend(
        [numpy_helper.from_array(w, "t_bias_w"), numpy_helper.from_array(np.array([1], np.int64), "t_axes")]
    )
    new = [
        helper.make_node("MatMul", [ln.output[0], "t_bias_w"], ["t_b"]),
        helper.make_node("Transpose", ["t_b"], ["t_bt"], perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", ["t_bt", "t_axes"], ["t_b4"]),
        helper.make_node("Add", [mask, "t_b4"], ["t_mask_and_bias"]),
    ]
    add.input[list(add.input).index(mask)] = "t_mask_and_bias"
    at = list(g.node).index(add)
    for i, n in enumerate(new):
        g.node.insert(at + i, n)
    onnx.save(m, path)


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("biased") / "tiny16"
    with_learned_attention_bias(d)
    return d


def test_fixture_vision_graphs_are_fused() -> None:
    for m in ["tiny16", "tiny6", "tiny16-gqa"]:
        assert lfm.Engine.from_dir(MODELS / m).spec["vision_attention"] == "fused"


def test_an_attention_with_a_learned_bias_keeps_it(biased: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = [grad(300, 400), grad(1100, 700)]
    opts = lfm.RequestOptions(max_new_tokens=12, repetition_penalty=1.0)
    fused = lfm.Engine.from_dir(biased)
    # The second layer's attention is still fused; the first keeps its bias.
    assert fused.spec["vision_attention"] == "fused"
    a = fused.next_token_logits("Describe these images.", imgs)
    ga = fused.generate("Describe these images.", imgs, opts)
    monkeypatch.setenv("LFM_NO_VISION_FUSION", "1")
    plain = lfm.Engine.from_dir(biased)
    assert plain.spec["vision_attention"] == "as_exported"
    b = plain.next_token_logits("Describe these images.", imgs)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(b).max()))
    assert ga.token_ids == plain.generate("Describe these images.", imgs, opts).token_ids
    # And the bias matters: without it the logits move.
    plain_tiny16 = lfm.Engine.from_dir(MODELS / "tiny16").next_token_logits("Describe these images.", imgs)
    assert np.abs(plain_tiny16 - b).max() > 1e-3
