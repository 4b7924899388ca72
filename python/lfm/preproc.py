"""Image preprocessing as the model sees it, without ONNX Runtime: tile plans,
placeholders, pixel tensors and EXIF-aware decoding."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _lfm
from ._images import ImageLike, to_core
from .errors import ImageError, InvalidOptionsError, LfmError
from .options import ImageBudget, coerce


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileGrid:
    """``rows x cols`` main tiles of ``tile`` = (h, w) pixels, then an optional thumbnail
    (h, w) of the whole image. A 1x1 grid is one smart-resized image."""

    rows: int
    cols: int
    tile: tuple[int, int]
    thumbnail: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tile", tuple(self.tile))
        if self.thumbnail is not None:
            object.__setattr__(self, "thumbnail", tuple(self.thumbnail))
        _sizes(
            InvalidOptionsError,
            ("rows", self.rows),
            ("cols", self.cols),
            *(("tile", v) for v in self.tile),
            *(("thumbnail", v) for v in self.thumbnail or ()),
        )
        entries, tokens = _lfm.grid_info(self.rows, self.cols, self.tile, self.thumbnail)
        object.__setattr__(self, "_entries", entries)
        object.__setattr__(self, "_tokens", tokens)

    @property
    def num_entries(self) -> int:
        """Entries the vision encoder sees: the tiles, plus the thumbnail."""
        n: int = self._entries  # type: ignore[attr-defined]
        return n

    @property
    def num_image_tokens(self) -> int:
        """``<image>`` tokens this image becomes (markers and wrappers not counted)."""
        n: int = self._tokens  # type: ignore[attr-defined]
        return n


_MAX_SIDE = 2**32 - 1


def _sizes(error: type[LfmError], *named: tuple[str, object]) -> None:
    """Refuses a negative or over-large count with ``error`` naming it (at the Rust boundary
    such ints raise a bare ``OverflowError``); non-integers stay a ``TypeError`` there."""
    for field, value in named:
        if isinstance(value, int) and not 0 <= value <= _MAX_SIDE:
            below = value < 0
            err = error(f"{field} is {value}, {'below 0' if below else f'over the limit of {_MAX_SIDE}'}")
            err.field, err.value, err.limit = field, str(value), "at least 0" if below else str(_MAX_SIDE)
            raise err


def _grid(t: tuple[int, int, tuple[int, int], tuple[int, int] | None]) -> TileGrid:
    return TileGrid(rows=t[0], cols=t[1], tile=t[2], thumbnail=t[3])


def _budget_json(budget: ImageBudget | Mapping[str, Any] | None) -> str:
    return json.dumps(coerce(ImageBudget, budget).to_dict())


def _plan(width: int, height: int, budget_json: str) -> TileGrid:
    """The one way to a plan, for ``plan`` and ``Preprocessor.plan``: sizes checked first."""
    _sizes(ImageError, ("width", width), ("height", height))
    return _grid(_lfm.plan(width, height, budget_json))


def plan(width: int, height: int, budget: ImageBudget | Mapping[str, Any] | None = None) -> TileGrid:
    """The tile plan for an image of ``width x height`` pixels (width first). ``budget`` is
    an ``ImageBudget``, a plain dict of its fields, or None (the defaults)."""
    return _plan(width, height, _budget_json(budget))


def placeholder_text(grid: TileGrid) -> str:
    """What replaces one ``<image>``: start/end wrappers, row/column markers (multi-tile
    only), the thumbnail marker, and the ``<image>`` tokens."""
    text: str = _lfm.placeholder_text(grid.rows, grid.cols, grid.tile, grid.thumbnail)
    return text


def decode(image: ImageLike) -> np.ndarray:
    """Decodes to a uint8 ``HxWx3`` array. Files and bytes get their EXIF orientation
    applied; arrays and PIL images are returned as RGB pixels, unchanged."""
    out: np.ndarray = _lfm.decode(to_core(image))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreprocessedImage:
    """Model-ready tensors of one image."""

    pixel_values: np.ndarray  # float32 [N, P, 768]
    pixel_attention_mask: np.ndarray  # int64 [N, P]
    spatial_shapes: np.ndarray  # int64 [N, 2]
    grid: TileGrid


class Preprocessor:
    """Plans and preprocesses images under one ``ImageBudget`` (or a plain dict of its
    fields, as ``options=`` takes)."""

    def __init__(self, budget: ImageBudget | Mapping[str, Any] | None = None) -> None:
        self.budget = coerce(ImageBudget, budget)
        self._json = _budget_json(self.budget)

    def plan(self, width: int, height: int) -> TileGrid:
        return _plan(width, height, self._json)

    def preprocess(self, image: ImageLike) -> PreprocessedImage:
        """Model-ready tensors of one image. ``pixel_values`` is a new array the caller owns;
        when it is freed its memory is kept (a few recent buffers, at most 80 MB) for the
        next call, which then takes no page faults."""
        pv, mask, shapes, grid = _lfm.preprocess(to_core(image), self._json)
        return PreprocessedImage(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=shapes, grid=_grid(grid))


__all__ = ["PreprocessedImage", "Preprocessor", "TileGrid", "decode", "placeholder_text", "plan"]
