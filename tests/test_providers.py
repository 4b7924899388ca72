"""Execution providers: an unavailable one falls back to the CPU with a warning naming it."""

from __future__ import annotations

import warnings

import lfm
import pytest
from conftest import MODELS, PROVIDERS

CUDA = "cuda" in lfm.available_providers()


@pytest.mark.skipif(CUDA, reason="this ONNX Runtime has CUDA")
def test_unavailable_provider_falls_back_to_cpu_with_a_warning() -> None:
    with pytest.warns(lfm.LfmWarning, match=r"`cuda` \(CUDAExecutionProvider\) is not available.*CPU"):
        e = lfm.Engine.from_dir(MODELS / "tiny6", lfm.EngineOptions(providers=("cuda", "cpu")))
    ref = lfm.Engine.from_dir(MODELS / "tiny6")
    opts = lfm.RequestOptions(max_new_tokens=5)
    assert e.generate("hi", options=opts).token_ids == ref.generate("hi", options=opts).token_ids


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(lfm.InvalidOptionsError, match="providers"):
        lfm.EngineOptions(providers=("gpu",))


@pytest.mark.skipif(PROVIDERS == ("cpu",), reason="set LFM_TEST_PROVIDERS (e.g. cuda) to test a GPU provider")
def test_requested_providers_are_really_used() -> None:
    # The decoding-parity tests (test_generate, test_batching) run on these providers too;
    # this proves they were registered rather than silently replaced by the CPU.
    assert set(PROVIDERS) <= set(lfm.available_providers())
    with warnings.catch_warnings():
        warnings.simplefilter("error", lfm.LfmWarning)
        e = lfm.Engine.from_dir(MODELS / "tiny16-gqa", lfm.EngineOptions(providers=PROVIDERS))
    assert len(e.generate("hi", options=lfm.RequestOptions(max_new_tokens=3)).token_ids) == 3
