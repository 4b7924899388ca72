"""Engine.from_pretrained offline, from a Hugging Face cache folder laid out as
huggingface_hub lays it out, populated with a tiny model."""

from __future__ import annotations

import pathlib
import shutil

import lfm
import pytest
from conftest import MODELS
from lfm.loaders import variant_files

pytest.importorskip("huggingface_hub")

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(tmp_path: pathlib.Path, repo: str) -> pathlib.Path:
    cache = tmp_path / "hub"
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / REVISION
    shutil.copytree(MODELS / "tiny16", snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    return cache


def test_from_pretrained_offline(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = hf_cache(tmp_path, "LiquidAI/tiny-test")
    e = lfm.Engine.from_pretrained("LiquidAI/tiny-test", cache_dir=cache)
    assert e.spec["hidden"] == 64
    ref = lfm.Engine.from_dir(MODELS / "tiny16")
    assert (
        e.generate("hi", options={"max_new_tokens": 3}).token_ids
        == ref.generate("hi", options={"max_new_tokens": 3}).token_ids
    )


def test_missing_repo_offline_is_a_model_load_error(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lfm.ModelLoadError, match="LiquidAI/absent"):
        lfm.Engine.from_pretrained("LiquidAI/absent", cache_dir=tmp_path)


def test_variant_files_are_only_what_is_needed() -> None:
    q4 = variant_files("q4")
    assert "onnx/decoder_model_merged_q4.onnx" in q4 and "onnx/embed_tokens.onnx" in q4
    assert not any(f.startswith("onnx/decoder_model_merged.onnx") for f in q4)
    mix = variant_files({"vision_encoder": "fp16", "embed_tokens": "fp16", "decoder_model_merged": "q4"})
    assert "onnx/vision_encoder_fp16.onnx_data" in mix and "tokenizer.json" in mix
