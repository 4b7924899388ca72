"""The compiled core of lfm (Rust, PyO3). Private: use the `lfm` package instead.

Every function converts its arguments to owned Rust values, releases the GIL, calls the
core and maps errors to the classes of `lfm.errors` (value problems are also ValueError;
a missing path is FileNotFoundError; a caught panic is lfm.InternalError)."""

from typing import Any, final

import numpy as np
import numpy.typing as npt

__version__: str

_GridTuple = tuple[int, int, tuple[int, int], tuple[int, int] | None]
_ImageArg = str | bytes | npt.NDArray[np.uint8]

def validate_options(kind: str, json: str) -> str:
    """Validates options given as JSON (`kind`: request, engine, image_budget, limits);
    returns them normalised with defaults filled in."""

def plan(width: int, height: int, budget_json: str) -> _GridTuple:
    """The tile plan `(rows, cols, (tile_h, tile_w), thumbnail)` of a `width x height` image."""

def grid_info(rows: int, cols: int, tile: tuple[int, int], thumbnail: tuple[int, int] | None = None) -> tuple[int, int]:
    """Validates a hand-made grid; returns `(num_entries, num_image_tokens)`."""

def placeholder_text(rows: int, cols: int, tile: tuple[int, int], thumbnail: tuple[int, int] | None = None) -> str:
    """What replaces one `<image>` for this grid."""

def decode(image: _ImageArg) -> npt.NDArray[np.uint8]:
    """Decodes to `HxWx3` uint8 RGB (EXIF orientation applied to files and bytes)."""

def preprocess(
    image: _ImageArg, budget_json: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64], _GridTuple]:
    """`(pixel_values, pixel_attention_mask, spatial_shapes, grid)` of one image."""

def apply_chat_template(
    messages_json: str,
    tools_json: str | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    bos_token: str = "<|startoftext|>",
) -> str:
    """Renders messages with a chat template (the bundled LFM2.5-VL one by default)."""

def check_grammar(kind: str, source: str) -> None:
    """Compiles a grammar (`json_schema`, `lark` or `regex`); raises GrammarError."""

def init_ort(path: str | None) -> str:
    """Loads ONNX Runtime's shared library once per process; returns the path in use."""

def available_providers() -> list[str]:
    """Execution providers the loaded ONNX Runtime offers (lfm's names), "cpu" first."""

def shutdown(timeout_s: float) -> bool:
    """Cancels every request in the process and waits (at most ``timeout_s``) until no
    scheduler thread runs ONNX Runtime; registered to run at interpreter exit."""

def bundled_file(name: str) -> bytes:
    """A file bundled with lfm: tokenizer.json, tokenizer_config.json, chat_template.jinja,
    config.json, preprocessor_config.json or processor_config.json."""

def tokenize(text: str, path: str | None = None) -> list[int]:
    """Token ids of `text` (no special tokens added) with a tokenizer.json, or the bundled one."""

def _panic_for_tests() -> None:
    """Panics inside the core (the test suite checks it comes back as InternalError)."""

@final
class Stream:
    """A running generation submitted to the engine's scheduler."""

    def __iter__(self) -> Stream: ...
    def __next__(self) -> str: ...
    def wait(self) -> dict[str, Any]:
        """Blocks (GIL released; Ctrl-C cancels the request) until the end; the result dict."""
    def result(self) -> dict[str, Any] | None:
        """The result dict once finished, else None."""
    def cancel(self) -> None:
        """Stops the generation at its next decode step."""

@final
class Engine:
    """A loaded model with its scheduler thread."""

    @staticmethod
    def from_dir(path: str, options_json: str) -> Engine: ...
    @staticmethod
    def from_onnx_dir(path: str, options_json: str) -> Engine: ...
    def spec(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, int]: ...
    def load_warnings(self) -> list[str]: ...
    def apply_chat_template(
        self, messages_json: str, tools_json: str | None = None, add_generation_prompt: bool = True
    ) -> str: ...
    def encode_prompt(self, messages_json: str, images: list[_ImageArg]) -> list[int]: ...
    def next_token_logits(self, messages_json: str, images: list[_ImageArg]) -> npt.NDArray[np.float32]: ...
    def check_grammar(self, kind: str, source: str) -> None: ...
    def generate(
        self, messages_json: str, images: list[_ImageArg], options_json: str, grammar: tuple[str, str] | None = None
    ) -> dict[str, Any]: ...
    def stream(
        self,
        messages_json: str,
        images: list[_ImageArg],
        options_json: str,
        grammar: tuple[str, str] | None = None,
        text: bool = True,
    ) -> Stream: ...
    def check_warnings(self) -> None: ...
