"""The `lfm` command: caption or analyse folders of images into JSON lines, inspect a
model, download one.

    lfm caption PATHS... --model DIR_OR_REPO [--task caption|image-analysis]
                [--schema FILE | --regex RE | --lark FILE] [--prompt TEXT]
                [--out FILE.jsonl] [--batch-size N] [--resume] [--variant V]
    lfm info MODEL
    lfm download REPO [--variant V]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from .errors import InvalidOptionsError, ModelLoadError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
DEFAULT_PROMPT = "Describe this image in one or two sentences."


def iter_images(paths: Sequence[str]) -> Iterator[pathlib.Path]:
    """Image files under `paths` (files as given, folders walked in sorted order)."""
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if pathlib.Path(f).suffix.lower() in IMAGE_SUFFIXES:
                        yield pathlib.Path(root) / f
        else:
            yield p


def positive_int(text: str) -> int:
    """argparse type of counts such as --batch-size: 0 or less would caption nothing."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {n}")
    return n


def option_error(option: str, path: str, problem: str) -> InvalidOptionsError:
    err = InvalidOptionsError(f"{option} {path}: {problem}")
    err.field, err.value = option, path
    return err


def read_text(path: str, option: str) -> str:
    """The UTF-8 text of the file an option names (a missing file is an OSError, which
    main reports; undecodable bytes would otherwise escape as a traceback)."""
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise option_error(option, path, f"not UTF-8 text ({e})") from None


def is_local_path(model: str) -> bool:
    """Whether `model` can only mean a folder: a Hub repo id (`name` or `owner/name`) is
    never absolute, never starts with `.` or `~` and has at most one `/`."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    )


def not_a_folder(path: str) -> ModelLoadError:
    problem = "is not a folder" if os.path.exists(path) else "does not exist"
    err = ModelLoadError(f"model folder {path} {problem}")
    err.path, err.field, err.value = path, "model", path
    return err


def load_engine(model: str, variant: str | None) -> Any:
    import lfm

    options = lfm.EngineOptions(variant=variant or "fp32")
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return lfm.Engine.from_dir(path, options)
    # A mistyped folder would otherwise go to the Hub and fail there with a confusing message.
    if is_local_path(model):
        raise not_a_folder(model)
    return lfm.Engine.from_pretrained(model, variant=variant, options=options)


def build_task(args: argparse.Namespace) -> Any:
    import lfm

    prompt = args.prompt
    if args.schema:
        text = read_text(args.schema, "--schema")
        try:
            schema = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json's stack
            raise option_error("--schema", args.schema, f"not JSON ({e})") from None
        return lfm.JsonTask(schema, prompt or "Describe this image as JSON.")
    if args.regex or args.lark:
        grammar = lfm.Grammar.regex(args.regex) if args.regex else lfm.Grammar.lark(read_text(args.lark, "--lark"))
        return _GrammarTask(prompt or DEFAULT_PROMPT, grammar)
    if args.task == "image-analysis":
        return lfm.ImageAnalysisTask(accept_empty=True)
    return None


class _GrammarTask:
    """A task returning the constrained text as it is."""

    def __init__(self, prompt: str, grammar: Any) -> None:
        self._prompt, self._grammar = prompt, grammar

    def prompt(self) -> str:
        return self._prompt

    def grammar(self) -> Any:
        return self._grammar

    def parse(self, text: str) -> str:
        return text

    def parse_ended(self, text: str, ends: Any) -> str:
        return text


def done_paths(out: pathlib.Path) -> set[str]:
    """Paths already written to `out` (complete lines only)."""
    done: set[str] = set()
    if out.exists():
        for line in read_text(str(out), "--out").splitlines():
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
    return done


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def record(path: pathlib.Path, result: Any, gen: Any = None) -> dict[str, Any]:
    if isinstance(result, BaseException):
        return {"path": str(path), "error": {"type": type(result).__name__, "message": str(result)}}
    rec: dict[str, Any] = {"path": str(path), "output": to_jsonable(result)}
    if gen is not None:
        rec["finish_reason"] = gen.finish_reason
        rec["timings"] = dataclasses.asdict(gen.timings)
    return rec


def caption(args: argparse.Namespace, stdout: TextIO) -> int:
    import lfm

    from ._batch import ProgressBar

    # The option files first: a mistake in them should not wait for a model load.
    task = build_task(args)
    options = lfm.RequestOptions(max_new_tokens=args.max_new_tokens)
    images = list(iter_images(args.paths))
    out_path = pathlib.Path(args.out) if args.out else None
    if out_path and args.resume:
        done = done_paths(out_path)
        images = [p for p in images if str(p) not in done]
    engine = load_engine(args.model, args.variant)
    if out_path and out_path.exists() and not args.resume:
        out_path.unlink()
    sink: TextIO = out_path.open("a", encoding="utf-8") if out_path else stdout
    bar = ProgressBar(len(images)) if (args.progress and images) else None
    written = 0
    try:
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            if task is None:
                gens = engine.generate_batch(
                    [args.prompt or DEFAULT_PROMPT] * len(chunk), images=[[p] for p in chunk], options=options
                )
                recs = [
                    record(
                        p,
                        g.text if not isinstance(g, BaseException) else g,
                        None if isinstance(g, BaseException) else g,
                    )
                    for p, g in zip(chunk, gens)
                ]
            else:
                outs = engine.run_batch(task, [str(p) for p in chunk], options=options)
                recs = [record(p, o) for p, o in zip(chunk, outs)]
            for rec in recs:
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                written += 1
            sink.flush()
            if bar:
                bar(written, len(images))
    except KeyboardInterrupt:
        sys.stderr.write(f"\ninterrupted: {written} of {len(images)} images written; --resume continues\n")
        return 130
    finally:
        if out_path:
            sink.close()
    return 0


def info(args: argparse.Namespace, stdout: TextIO) -> int:
    import lfm

    from .loaders import GRAPHS, SUFFIX

    root = pathlib.Path(args.model).expanduser()
    if not root.is_dir():  # else the report would list no variants and exit 0
        raise not_a_folder(str(root))
    onnx = root / "onnx" if (root / "onnx").is_dir() else root
    variants = {g: [p for p, s in SUFFIX.items() if (onnx / f"{g}{s}.onnx").exists()] for g in GRAPHS}
    report: dict[str, Any] = {"path": str(root), "graph_folder": str(onnx), "variants": variants}
    fp32 = all("fp32" in v for v in variants.values())
    if fp32:
        engine = lfm.Engine.from_dir(root)
        report["widths"] = engine.spec
    report["providers"] = lfm.available_providers()
    stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def download(args: argparse.Namespace, stdout: TextIO) -> int:
    from .loaders import download as fetch

    stdout.write(fetch(args.repo, args.variant or "fp32") + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lfm", description="LFM2.5-VL on ONNX Runtime")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("caption", help="caption or analyse images into JSON lines")
    c.add_argument("paths", nargs="+", help="image files or folders")
    c.add_argument("--model", required=True, help="model folder or Hugging Face repo id")
    c.add_argument("--variant", default=None, help="fp32, fp16, q4 or q8")
    c.add_argument("--task", choices=["caption", "image-analysis"], default="caption")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--schema", help="JSON Schema file: constrain the output to it")
    g.add_argument("--regex", help="regular expression the whole output must match")
    g.add_argument("--lark", help="Lark grammar file")
    c.add_argument("--prompt", default=None)
    c.add_argument("--out", help="JSON lines file (default: standard output)")
    c.add_argument("--batch-size", type=positive_int, default=8)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--resume", action="store_true", help="skip images already in --out")
    c.add_argument("--no-progress", dest="progress", action="store_false")
    i = sub.add_parser("info", help="graphs, variants, widths and providers of a model folder")
    i.add_argument("model")
    d = sub.add_parser("download", help="download a model repository into the HF cache")
    d.add_argument("repo")
    d.add_argument("--variant", default=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import lfm

    args = parser().parse_args(argv)
    try:
        return {"caption": caption, "info": info, "download": download}[args.command](args, sys.stdout)
    except (lfm.LfmError, OSError) as e:
        sys.stderr.write(f"lfm: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
