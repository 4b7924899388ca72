"""Grammars for the conformance suite: 52 JSON Schemas, 20 regexes and 10 Lark grammars
covering what the constrained decoder must enforce. Free strings are mostly bounded so
that a random-weight model finishes within the token budget."""

from __future__ import annotations

from typing import Any

S = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": -50, "maximum": 50}


def obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = False, **kw: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": extra,
        **kw,
    }


JSON_SCHEMAS: dict[str, dict[str, Any]] = {
    "integer": {"type": "integer"},
    "bounded_integer": {"type": "integer", "minimum": 3, "maximum": 9},
    "exclusive_bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "negative_number": {"type": "number", "maximum": -1.5},
    "multiple_of": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "short_string": {"type": "string", "maxLength": 8},
    "string_bounds": {"type": "string", "minLength": 3, "maxLength": 6},
    "enum_strings": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": ["a", 1, True, None]},
    "const": {"const": "fixed value"},
    "pattern_code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "pattern_unanchored": {"type": "string", "pattern": "[a-z]+@[a-z]+", "maxLength": 20},
    "format_date": {"type": "string", "format": "date"},
    "format_uuid": {"type": "string", "format": "uuid"},
    "format_email": {"type": "string", "format": "email", "maxLength": 30},
    "format_ipv4": {"type": "string", "format": "ipv4"},
    # (format "date-time" is left out: llguidance admits leap second 60, which RFC 3339
    # allows but the jsonschema checker refuses.)
    "pattern_date_time": {"type": "string", "pattern": "^[0-9]{4}-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]Z$"},
    "array_bounds": {"type": "array", "items": INT, "minItems": 2, "maxItems": 4},
    "array_of_strings": {"type": "array", "items": S, "maxItems": 3},
    "empty_array": {"type": "array", "maxItems": 0},
    "prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 5}, {"type": "integer"}],
        "items": False,
    },
    "flat_object": obj({"name": S, "age": INT, "ok": {"type": "boolean"}}),
    "optional_fields": obj({"a": S, "b": INT, "c": {"type": "boolean"}}, required=["a"]),
    "no_required": obj({"x": INT, "y": INT}, required=[]),
    "nested_object": obj(
        {"user": obj({"id": INT, "tags": {"type": "array", "items": S, "maxItems": 2}}), "active": {"type": "boolean"}}
    ),
    "deep_nesting": obj({"a": obj({"b": obj({"c": obj({"d": INT})})})}),
    "array_of_objects": {"type": "array", "items": obj({"k": S, "v": INT}), "minItems": 1, "maxItems": 3},
    "nullable_type_list": obj(
        {"note": {"type": ["string", "null"], "maxLength": 10}, "n": {"type": ["integer", "null"]}}
    ),
    "nullable_anyof": obj({"maybe": {"anyOf": [INT, {"type": "null"}]}}),
    "anyof_types": {"anyOf": [INT, S, {"type": "boolean"}]},
    "anyof_objects": {"anyOf": [obj({"cat": S}), obj({"dog": INT})]},
    "oneof_tagged": {
        "oneOf": [
            obj({"kind": {"const": "circle"}, "r": INT}),
            obj({"kind": {"const": "square"}, "side": INT}),
        ]
    },
    "oneof_types": {"oneOf": [{"type": "string", "maxLength": 5}, {"type": "boolean"}]},
    "allof_merge": {"allOf": [obj({"a": INT}, extra=True), obj({"b": S}, extra=True)]},
    "ref_defs": {
        "$defs": {"point": obj({"x": INT, "y": INT})},
        **obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
    "ref_definitions": {
        "definitions": {"tag": S},
        "type": "array",
        "items": {"$ref": "#/definitions/tag"},
        "maxItems": 3,
    },
    "recursive_tree": {
        "$defs": {
            "node": obj(
                {"v": INT, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, required=["v"]
            )
        },
        "$ref": "#/$defs/node",
    },
    "recursive_list": {
        "$defs": {
            "cell": obj({"head": {"type": "integer"}, "tail": {"anyOf": [{"$ref": "#/$defs/cell"}, {"type": "null"}]}})
        },
        "$ref": "#/$defs/cell",
    },
    "additional_properties_schema": {"type": "object", "additionalProperties": INT, "maxProperties": 3},
    "min_max_properties": {
        "type": "object",
        "additionalProperties": {"type": "boolean"},
        "minProperties": 1,
        "maxProperties": 2,
    },
    "pattern_properties": {
        "type": "object",
        "patternProperties": {"^n_[a-z]{1,4}$": INT},
        "additionalProperties": False,
        "maxProperties": 2,
    },
    "enum_in_object": obj({"size": {"enum": ["s", "m", "l"]}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}),
    "const_in_object": obj({"version": {"const": 2}, "data": S}),
    "array_of_enums": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 5},
    "matrix": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        "minItems": 2,
        "maxItems": 2,
    },
    "image_analysis_like": obj(
        {"description": {"type": "string", "maxLength": 40}, "tags": {"type": "array", "items": S, "maxItems": 4}}
    ),
    "unicode_const": {"const": "café ☕ 日本"},
    "number_or_string_bounds": obj(
        {
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "label": {"type": "string", "minLength": 1, "maxLength": 4},
        }
    ),
    "invoice": obj(
        {
            "id": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
            "lines": {
                "type": "array",
                "items": obj(
                    {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}$"},
                        "n": {"type": "integer", "minimum": 1, "maximum": 99},
                    }
                ),
                "minItems": 1,
                "maxItems": 2,
            },
            "paid": {"type": "boolean"},
            "due": {"type": "string", "format": "date"},
        }
    ),
    "title_and_description_annotations": {"title": "T", "description": "annotations only", **obj({"q": INT})},
}

REGEXES: list[str] = [
    r"[0-9]+",
    r"[a-z]{3,8}",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{2,5} [A-Z][a-z]{2,5}",
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    r"\+?[0-9]{1,3}( [0-9]{3}){2}",
    r"(ab)+c?",
    r"[a-f0-9]{8}",
    r"(red|green|blue)(, (red|green|blue)){0,2}",
    r"[A-Z]{2}-[0-9]{3}",
    r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,2})?",
    r"[a-z]+@[a-z]+\.(com|org)",
    r"(\([a-z]\))+",
    r"x{3}y{0,2}z",
    r"[^a-z ]{2,6}",
    r"(cat|dog)s?",
    r"v[0-9]\.[0-9]\.[0-9]",
    r"[ab]*c[ab]*",
    r"(0|1){5,7}",
    r"é{1,3}[a-z]?",
]

LARK: dict[str, str] = {
    "digits": "start: DIGIT+\nDIGIT: /[0-9]/",
    "greeting": 'start: "hello" " " name\nname: /[a-z]{2,6}/',
    "sum": 'start: num (" + " num)*\nnum: /[0-9]{1,3}/',
    "csv_row": 'start: field ("," field)*\nfield: /[a-z]{1,5}/',
    "parens": 'start: group+\ngroup: "(" group* ")"',
    "key_values": 'start: pair (";" pair)*\npair: KEY "=" VALUE\nKEY: /[a-z]{1,4}/\nVALUE: /[0-9]{1,2}/',
    "choice": 'start: animal " " sound\nanimal: "cat" | "dog" | "cow"\nsound: "meow" | "woof" | "moo"',
    "list": 'start: "[" (item ("," item)*)? "]"\nitem: /[a-z]/ | /[0-9]/',
    "sentence": 'start: WORD (" " WORD)* "."\nWORD: /[A-Za-z]{1,6}/',
    "arith": 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]{1,2}/',
}
