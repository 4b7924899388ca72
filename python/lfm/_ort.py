"""Finding and loading the ONNX Runtime shared library of the installed ``onnxruntime``
wheel (or ``onnxruntime-gpu``), without importing it. ``ORT_DYLIB_PATH`` overrides."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import threading

from . import _lfm
from .errors import ModelLoadError

_lock = threading.Lock()
_loaded: str | None = None


def find_library() -> str:
    override = os.environ.get("ORT_DYLIB_PATH")
    if override:
        return os.path.abspath(override)
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu), "
            "or set ORT_DYLIB_PATH to libonnxruntime"
        )
    capi = os.path.join(list(spec.submodule_search_locations)[0], "capi")
    if sys.platform == "win32":
        patterns = ["onnxruntime.dll"]
    elif sys.platform == "darwin":
        patterns = ["libonnxruntime.*.dylib", "libonnxruntime.dylib"]
    else:
        patterns = ["libonnxruntime.so.*", "libonnxruntime.so"]
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(capi, pattern)))
        if found:
            return found[-1]
    raise ModelLoadError(f"the onnxruntime package at {capi} has no shared library (needs onnxruntime >= 1.22)")


def ensure_loaded() -> str:
    """Loads ONNX Runtime once per process (on the first Engine)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _lfm.init_ort(find_library())
        return _loaded


def available_providers() -> list[str]:
    """The execution providers the installed ONNX Runtime offers, by lfm's names
    (``"cpu"`` always; ``"cuda"`` etc. with ``onnxruntime-gpu`` and its libraries)."""
    ensure_loaded()
    return list(_lfm.available_providers())
