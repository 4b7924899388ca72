"""The real LFM2.5-VL-450M tokenizer and configs bundled with lfm: special-token ids,
prompt ids equal to Python `tokenizers` on the same file, from_onnx_dir, and from_dir's
check against the bundled copies."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import lfm
import pytest
from conftest import MODELS, golden
from lfm import _lfm
from lfm.bundled import bundled_file
from tokenizers import Tokenizer

SPECIAL = {
    "<|pad|>": 0,
    "<|startoftext|>": 1,
    "<|im_start|>": 6,
    "<|im_end|>": 7,
    "<|tool_call_start|>": 10,
    "<|tool_call_end|>": 11,
    "<image>": 396,
    "<|img_row_1_col_1|>": 397,
    "<|img_row_10_col_10|>": 496,
    "<|img_thumbnail|>": 497,
    "<|image_start|>": 498,
    "<|image_end|>": 499,
}


def test_provenance() -> None:
    data = bundled_file("tokenizer.json")
    assert hashlib.sha256(data).hexdigest() == "f3910942aa907c48b0cc20ec426ee38bfa8dcda8feecf035ced981918cb30f14"
    assert len(json.loads(data)["added_tokens"]) > 400


@pytest.mark.parametrize(("token", "id_"), list(SPECIAL.items()))
def test_special_token_ids(token: str, id_: int) -> None:
    assert _lfm.tokenize(token) == [id_]


def test_prompt_ids_equal_python_tokenizers() -> None:
    reference = Tokenizer.from_str(bundled_file("tokenizer.json").decode())
    for case in golden("chat_template.json")["cases"]:
        text = lfm.chat.apply_chat_template(case["messages"], case["add_generation_prompt"], case["tools"])
        assert _lfm.tokenize(text) == reference.encode(text, add_special_tokens=False).ids, case["name"]
    for text in [
        "Describe this image.",
        "  spaces\tand\nnewlines 123456 ünïcödé 日本語 🙂",
        "<|im_start|>user\nHi<|im_end|>",
    ]:
        assert _lfm.tokenize(text) == reference.encode(text, add_special_tokens=False).ids


def test_from_onnx_dir_uses_the_bundled_tokenizer() -> None:
    # The tiny graphs have 1,024 logits, fewer than the real tokenizer's 64,400 tokens.
    with pytest.raises(lfm.ModelLoadError, match="bundled tokenizer.*64400 tokens but the decoder only 1024"):
        lfm.Engine.from_onnx_dir(MODELS / "tiny16")
    with pytest.raises(FileNotFoundError):
        lfm.Engine.from_onnx_dir(MODELS / "absent")


def real_looking(tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "m"
    shutil.copytree(MODELS / "tiny16", d)
    (d / "config.json").write_bytes(bundled_file("config.json"))
    return d


def test_strict_from_dir_explains_a_different_tokenizer(tmp_path: pathlib.Path) -> None:
    d = real_looking(tmp_path)
    with pytest.raises(lfm.ModelLoadError, match="tokenizer.json.*differs.*special token '<\\|fim_pre\\|>'"):
        lfm.Engine.from_dir(d)
    assert lfm.Engine.from_dir(d, strict=False).spec["hidden"] == 64


def test_strict_from_dir_explains_a_different_template(tmp_path: pathlib.Path) -> None:
    d = real_looking(tmp_path)
    (d / "tokenizer.json").write_bytes(bundled_file("tokenizer.json"))
    (d / "chat_template.jinja").write_text(
        (d / "chat_template.jinja").read_text().replace("<|im_start|>assistant", "<|im_start|>bot")
    )
    with pytest.raises(lfm.ModelLoadError, match="chat template differs"):
        lfm.Engine.from_dir(d)


def test_other_models_are_not_compared() -> None:
    assert lfm.Engine.from_dir(MODELS / "tiny6").spec["vocab"] == 896
