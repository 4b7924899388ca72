"""Ray Data integration: caption or analyse a dataset of images on a cluster, one engine
per actor.

    import ray, lfm
    from lfm.integrations.ray import LfmPredictor

    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
    out = ds.map_batches(
        LfmPredictor,
        fn_constructor_kwargs={"model": "LiquidAI/LFM2.5-VL-450M-ONNX", "task": "image-analysis"},
        concurrency=4,          # actors (one engine each)
        batch_size=16,
        num_cpus=2,
    )

Each input row carries an image as ``bytes`` (column ``bytes``, as ``read_binary_files``
gives it) or a path (column ``path``); each output row adds ``output`` (JSON text of the
result) and ``error`` (the exception text, or empty).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import lfm


def _to_json(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "model_dump"):
        value = value.model_dump()
    return json.dumps(value, ensure_ascii=False)


class LfmPredictor:
    """A callable class for ``ray.data.Dataset.map_batches``: the engine is loaded once
    per actor and each batch goes through ``run_batch`` (decoder steps batched)."""

    def __init__(
        self,
        model: str,
        task: str | lfm.Task[Any] = "caption",
        prompt: str = "Describe this image in one or two sentences.",
        options: lfm.RequestOptions | Mapping[str, Any] | None = None,
        engine_options: lfm.EngineOptions | Mapping[str, Any] | None = None,
    ) -> None:
        if os.path.exists(model):
            self.engine = lfm.Engine.from_dir(model, engine_options)
        else:
            self.engine = lfm.Engine.from_pretrained(model, options=engine_options)
        self.task: lfm.Task[Any] | None
        if isinstance(task, str):
            if task not in ("caption", "image-analysis"):
                raise ValueError(f"task must be 'caption', 'image-analysis' or an lfm.Task, got {task!r}")
            self.task = lfm.ImageAnalysisTask(accept_empty=True) if task == "image-analysis" else None
        else:
            self.task = task
        self.prompt = prompt
        self.options = options

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        images = list(batch["bytes"]) if "bytes" in batch else [str(p) for p in batch["path"]]
        images = [bytes(i) if isinstance(i, (bytearray, memoryview)) else i for i in images]
        if self.task is None:
            results: list[Any] = self.engine.generate_batch(
                [self.prompt] * len(images), images=[[i] for i in images], options=self.options
            )
            results = [r if isinstance(r, Exception) else r.text for r in results]
        else:
            results = self.engine.run_batch(self.task, images, options=self.options)
        out: dict[str, list[Any]] = {k: list(v) for k, v in batch.items() if k != "bytes"}
        out["output"] = [
            "" if isinstance(r, Exception) else (r if isinstance(r, str) else _to_json(r)) for r in results
        ]
        out["error"] = [f"{type(r).__name__}: {r}" if isinstance(r, Exception) else "" for r in results]
        return out
