"""lfm: LiquidAI's LFM2.5-VL-450M on ONNX Runtime, with a Rust core.

The model weights are under the LFM Open License v1.0, separate from this code.
"""

from __future__ import annotations

from . import chat, preproc
from ._lfm import __version__
from ._ort import available_providers
from .engine import Engine, TextStream
from .errors import (
    GrammarError,
    ImageError,
    InferenceError,
    InternalError,
    InvalidOptionsError,
    LfmError,
    LfmWarning,
    ModelLoadError,
    ParseError,
    PromptTooLongError,
    RequestRejectedError,
)
from .grammar import Grammar
from .image_analysis import ImageAnalysis, ImageAnalysisTask
from .options import EngineOptions, ImageBudget, Limits, RequestOptions
from .results import Generation, Timings, Usage
from .tasks import FieldEnd, JsonTask, Task

__all__ = [
    "Engine",
    "EngineOptions",
    "FieldEnd",
    "Grammar",
    "ImageAnalysis",
    "ImageAnalysisTask",
    "JsonTask",
    "Task",
    "TextStream",
    "Generation",
    "GrammarError",
    "ImageBudget",
    "ImageError",
    "InferenceError",
    "InternalError",
    "InvalidOptionsError",
    "LfmError",
    "LfmWarning",
    "Limits",
    "ModelLoadError",
    "ParseError",
    "PromptTooLongError",
    "RequestOptions",
    "RequestRejectedError",
    "Timings",
    "Usage",
    "__version__",
    "available_providers",
    "chat",
    "preproc",
]
