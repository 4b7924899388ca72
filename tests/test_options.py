"""Options: defaults from SPEC, keyword-only and frozen, validated in Rust with errors that
name the field, the value and the allowed range, and dict round-trips."""

from __future__ import annotations

import dataclasses
import decimal
import fractions

import lfm
import numpy as np
import pytest


def test_defaults() -> None:
    r = lfm.RequestOptions()
    assert (r.max_new_tokens, r.min_new_tokens, r.temperature, r.top_k, r.top_p, r.min_p) == (512, 0, 0.0, 0, 1.0, 0.0)
    assert (r.repetition_penalty, r.seed, r.stop) == (1.05, None, ())
    m = lfm.RequestOptions.model_card()
    assert (m.temperature, m.min_p, m.repetition_penalty) == (0.1, 0.15, 1.05)
    e = lfm.EngineOptions()
    assert (e.variant, e.providers, e.max_batch_size) == ("fp32", ("cpu",), 8)
    assert e.image_budget == lfm.ImageBudget() == lfm.ImageBudget.quality()
    lim = lfm.Limits()
    assert (lim.max_messages, lim.max_content_parts, lim.max_text_bytes) == (1024, 8192, 2_048_000)
    assert (lim.max_image_side, lim.max_decoded_image_bytes, lim.context_tokens) == (16384, 256 * 1024 * 1024, 128_000)


def test_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        lfm.RequestOptions(10)  # type: ignore[misc]
    r = lfm.RequestOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.temperature = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (lfm.RequestOptions, {"max_new_tokens": 0}, "max_new_tokens"),
        (lfm.RequestOptions, {"max_new_tokens": 10**6}, "max_new_tokens"),
        (lfm.RequestOptions, {"min_new_tokens": 600}, "min_new_tokens"),
        (lfm.RequestOptions, {"temperature": -0.5}, "temperature"),
        (lfm.RequestOptions, {"temperature": float("nan")}, "temperature"),
        (lfm.RequestOptions, {"top_p": 0.0}, "top_p"),
        (lfm.RequestOptions, {"top_p": 1.5}, "top_p"),
        (lfm.RequestOptions, {"min_p": -0.1}, "min_p"),
        (lfm.RequestOptions, {"repetition_penalty": 0.0}, "repetition_penalty"),
        # Would multiply logits past f32 (+inf; sampling then fails).
        (lfm.RequestOptions, {"repetition_penalty": 1e-39}, "repetition_penalty"),
        (lfm.RequestOptions, {"stop": ("",)}, "stop"),
        (lfm.RequestOptions, {"timeout_s": -1.0}, "timeout_s"),
        # Longer than the clock can add (Rust's Duration/Instant would panic).
        (lfm.RequestOptions, {"timeout_s": 1e20}, "timeout_s"),
        (lfm.RequestOptions, {"timeout_s": float("inf")}, "timeout_s"),
        (lfm.ImageBudget, {"max_tiles": 11}, "image_budget.max_tiles"),
        (lfm.ImageBudget, {"min_image_tokens": 0}, "image_budget.min_image_tokens"),
        (lfm.ImageBudget, {"max_image_tokens": 2000}, "image_budget.max_image_tokens"),
        (lfm.ImageBudget, {"max_pixels_tolerance": 0.0}, "image_budget.max_pixels_tolerance"),
        (lfm.Limits, {"context_tokens": 0}, "limits.context_tokens"),
        # Non-finite values are refused in Python; they carry the section prefix all the same.
        (lfm.Limits, {"context_tokens": float("nan")}, "limits.context_tokens"),
        (lfm.ImageBudget, {"max_pixels_tolerance": float("inf")}, "image_budget.max_pixels_tolerance"),
        (lfm.EngineOptions, {"limits": {"max_image_side": float("inf")}}, "limits.max_image_side"),
        (lfm.EngineOptions, {"providers": ("tpu",)}, "providers"),
        (lfm.EngineOptions, {"variant": "q3"}, "variant"),
        (lfm.EngineOptions, {"max_batch_size": 0}, "max_batch_size"),
        (lfm.EngineOptions, {"intra_threads": 0}, "intra_threads"),
        # ONNX Runtime would start ~3x that many threads: past the system's limit.
        (lfm.EngineOptions, {"intra_threads": 65535}, "intra_threads"),
        (lfm.EngineOptions, {"inter_threads": 257}, "inter_threads"),
    ],
)
def test_out_of_range_values_are_refused(cls: type, kwargs: dict, field: str) -> None:
    with pytest.raises(lfm.InvalidOptionsError) as info:
        cls(**kwargs)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, lfm.LfmError)
    assert err.field == field
    assert err.value is not None and err.limit is not None
    assert field.split(".")[-1] in str(err)


@pytest.mark.parametrize(
    ("cls", "data", "field", "value"),
    [
        (lfm.RequestOptions, {"seed": -1}, "seed", "-1"),
        (lfm.RequestOptions, {"max_new_tokens": -1}, "max_new_tokens", "-1"),
        (lfm.RequestOptions, {"top_k": 2.5}, "top_k", "2.5"),
        (lfm.RequestOptions, {"temperature": "0.5"}, "temperature", '"0.5"'),
        (lfm.RequestOptions, {"stop": ["a", 1]}, "stop", "1"),
        (lfm.RequestOptions, {"temperatur": 0.5}, "temperatur", "temperatur"),
        (lfm.EngineOptions, {"intra_threads": 70000}, "intra_threads", "70000"),
        (lfm.EngineOptions, {"batching": "maybe"}, "batching", '"maybe"'),
        (lfm.EngineOptions, {"limits": {"bogus": 1}}, "limits.bogus", "bogus"),
        (lfm.EngineOptions, {"limits": {"context_tokens": -5}}, "limits.context_tokens", "-5"),
        (lfm.EngineOptions, {"image_budget": {"max_tiles": 2.5}}, "image_budget.max_tiles", "2.5"),
        (lfm.Limits, {"bogus": 1}, "limits.bogus", "bogus"),
        (lfm.ImageBudget, {"use_thumbnail": "yes"}, "image_budget.use_thumbnail", '"yes"'),
    ],
)
def test_type_and_sign_errors_name_the_field(cls: type, data: dict, field: str, value: str) -> None:
    """Values of the wrong kind (negative counts, fractions, strings for numbers) and unknown
    keys, nested ones included, name the field's path and its value, not the whole section."""
    builds = [lambda: cls.from_dict(data)]
    if set(data) <= {f.name for f in dataclasses.fields(cls)}:
        builds.append(lambda: cls(**data))
    for build in builds:
        with pytest.raises(lfm.InvalidOptionsError) as info:
            build()
        err = info.value
        assert (err.field, err.value) == (field, value)
        assert err.limit and field.split(".")[-1] in str(err)


@pytest.mark.parametrize(
    "opts",
    [
        lfm.RequestOptions(max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9, seed=3, stop=("x", "yz")),
        lfm.ImageBudget.fast(),
        lfm.Limits(context_tokens=4096),
        lfm.EngineOptions(variant={"decoder_model_merged": "q4"}, image_budget=lfm.ImageBudget.single_tile(64)),
    ],
)
def test_dict_round_trip(opts: object) -> None:
    d = opts.to_dict()  # type: ignore[attr-defined]
    assert type(opts).from_dict(d) == opts  # type: ignore[attr-defined]


def test_unknown_keys_name_the_allowed_ones() -> None:
    with pytest.raises(lfm.InvalidOptionsError) as info:
        lfm.RequestOptions.from_dict({"temperatur": 0.5})
    msg = str(info.value)
    assert "temperatur" in msg and "temperature" in msg and "max_new_tokens" in msg
    with pytest.raises(lfm.InvalidOptionsError):
        lfm.EngineOptions.from_dict({"image_budget": {"max_tile": 3}})


def test_options_accept_dicts_where_objects_go() -> None:
    e = lfm.EngineOptions(image_budget={"max_tiles": 4}, limits={"max_messages": 3})  # type: ignore[arg-type]
    assert e.image_budget.max_tiles == 4 and e.limits.max_messages == 3
    assert lfm.RequestOptions(stop="END").stop == ("END",)


@pytest.mark.parametrize("field", ["image_budget", "limits"])
@pytest.mark.parametrize("value", [[1, 1, 1, 1, 1, 1], (64,), [], None, "fast"])
def test_a_section_must_be_its_object_or_a_dict(field: str, value: object) -> None:
    """The core would fill a section's fields from a list by position; a section is its
    options object or a dict, else the error names the section."""
    for build in (lambda: lfm.EngineOptions(**{field: value}), lambda: lfm.EngineOptions.from_dict({field: value})):
        with pytest.raises(lfm.InvalidOptionsError) as info:
            build()
        assert info.value.field == field and info.value.value and info.value.limit


def test_numpy_numbers_stand_for_python_numbers() -> None:
    """A value read from an array (np.int64, np.float32, np.bool_) is the number it holds,
    in keywords and in dicts (the form ``generate(options=...)`` takes)."""
    kwargs = {"max_new_tokens": np.int64(8), "temperature": np.float32(0.5), "seed": np.uint64(3)}
    for r in (lfm.RequestOptions(**kwargs), lfm.RequestOptions.from_dict(kwargs)):
        assert r == lfm.RequestOptions(max_new_tokens=8, temperature=0.5, seed=3)
        assert type(r.max_new_tokens) is int and type(r.temperature) is float and type(r.seed) is int
    e = lfm.EngineOptions(max_batch_size=np.int32(4), limits={"context_tokens": np.int16(4096)})
    assert type(e.max_batch_size) is int and e.limits.context_tokens == 4096
    assert lfm.ImageBudget(use_thumbnail=np.bool_(False)).use_thumbnail is False
    with pytest.raises(lfm.InvalidOptionsError) as info:
        lfm.RequestOptions(temperature=np.float32("nan"))
    assert info.value.field == "temperature"


@pytest.mark.parametrize("value", [decimal.Decimal("0.5"), fractions.Fraction(1, 2), 0.5j, object(), np.array(0.5)])
def test_values_json_cannot_carry_name_the_field(value: object) -> None:
    for build in (
        lambda: lfm.RequestOptions(temperature=value),
        lambda: lfm.RequestOptions.from_dict({"temperature": value}),
    ):
        with pytest.raises(lfm.InvalidOptionsError) as info:
            build()
        assert info.value.field == "temperature" and info.value.value and info.value.limit
    with pytest.raises(lfm.InvalidOptionsError) as info:
        lfm.EngineOptions(limits={"max_image_side": value})
    assert info.value.field == "limits.max_image_side"


def test_none_for_stop_and_providers_is_the_default() -> None:
    assert lfm.RequestOptions(stop=None).stop == () == lfm.RequestOptions.from_dict({"stop": None}).stop  # type: ignore[arg-type]
    assert lfm.EngineOptions(providers=None).providers == lfm.EngineOptions().providers  # type: ignore[arg-type]
    assert lfm.EngineOptions.from_dict({"providers": None}) == lfm.EngineOptions()


@pytest.mark.parametrize("value", [5, {"a": 1}, b"ab"])
def test_stop_and_providers_that_are_not_strings_name_the_field(value: object) -> None:
    with pytest.raises(lfm.InvalidOptionsError) as info:
        lfm.RequestOptions(stop=value)  # type: ignore[arg-type]
    assert info.value.field == "stop"
    with pytest.raises(lfm.InvalidOptionsError) as info:
        lfm.EngineOptions(providers=value)  # type: ignore[arg-type]
    assert info.value.field == "providers"


def test_a_stop_string_that_is_not_text_names_itself() -> None:
    """A lone surrogate cannot reach the core (UTF-8 cannot carry it); the error names the
    string, not the whole options JSON."""
    with pytest.raises(lfm.InvalidOptionsError) as info:
        lfm.RequestOptions(stop=["ok", "\ud800"])
    assert (info.value.field, info.value.value) == ("stop", "'\\ud800'")
