"""Model folders from the Hugging Face Hub (through `huggingface_hub`, an optional
dependency): only the files the chosen variant needs, honouring `HF_HUB_OFFLINE` and the
Hugging Face cache."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .errors import ModelLoadError

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
SUFFIX = {"fp32": "", "fp16": "_fp16", "q4": "_q4", "q8": "_q8"}
SMALL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def precision_of(variant: str | Mapping[str, str], graph: str) -> str:
    """The precision a variant uses for one graph (embed_tokens has no q4/q8 files)."""
    if isinstance(variant, str):
        if graph == "embed_tokens" and variant in ("q4", "q8"):
            return "fp32"
        return variant
    return variant.get(graph, "fp32")


def variant_files(variant: str | Mapping[str, str]) -> list[str]:
    """Repository paths a variant needs: its graphs with their external-data sidecars, and
    the tokenizer and config files."""
    files = list(SMALL_FILES)
    for g in GRAPHS:
        p = precision_of(variant, g)
        if p not in SUFFIX:
            raise ValueError(f"unknown precision {p!r} for {g}; expected one of {', '.join(SUFFIX)}")
        name = f"onnx/{g}{SUFFIX[p]}.onnx"
        files += [name, name + "_data", name + "_data_*"]
    return files


def download(
    repo_id: str,
    variant: str | Mapping[str, str] = "fp32",
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> str:
    """Downloads (or finds in the cache) what `variant` needs; returns the local folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(
            "Engine.from_pretrained needs huggingface_hub: pip install huggingface_hub "
            "(or download the repository yourself and use Engine.from_dir)"
        ) from None
    kwargs: dict[str, Any] = {"repo_id": repo_id, "revision": revision, "allow_patterns": variant_files(variant)}
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        return str(snapshot_download(**kwargs))
    except Exception as e:  # huggingface_hub raises many kinds; name the repo and what failed
        raise ModelLoadError(f"cannot get {repo_id} ({variant}) from the Hugging Face Hub or its cache: {e}") from e
