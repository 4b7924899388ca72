"""Execution providers: an unavailable one falls back to the CPU with a warning naming it."""

from __future__ import annotations

import lfm
import pytest
from conftest import MODELS


def test_unavailable_provider_falls_back_to_cpu_with_a_warning() -> None:
    with pytest.warns(lfm.LfmWarning, match=r"`cuda` \(CUDAExecutionProvider\) is not available.*CPU"):
        e = lfm.Engine.from_dir(MODELS / "tiny6", lfm.EngineOptions(providers=("cuda", "cpu")))
    ref = lfm.Engine.from_dir(MODELS / "tiny6")
    opts = lfm.RequestOptions(max_new_tokens=5)
    assert e.generate("hi", options=opts).token_ids == ref.generate("hi", options=opts).token_ids


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(lfm.InvalidOptionsError, match="providers"):
        lfm.EngineOptions(providers=("gpu",))
