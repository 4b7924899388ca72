//! `json.dumps` as Python writes it, for the chat template's `tojson` filter.
//!
//! transformers registers its own `tojson` (`json.dumps(x, ensure_ascii=False, ...)`), which
//! neither HTML-escapes nor compacts, and prints floats as Python's `repr` does. Prompts must
//! be byte-identical, so this mirrors it.

use std::fmt::Write;

use minijinja::value::{Value, ValueKind};

/// Formatting switches of `json.dumps`.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub ensure_ascii: bool,
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions { ensure_ascii: false, indent: None, item_sep: ", ".into(), key_sep: ": ".into(), sort_keys: false }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside 1e-4..1e16.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // `{:e}` gives the shortest round-trip mantissa: "d.ddde±x".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Serialises `v` like `json.dumps(v, **opts)`.
pub fn dumps(v: &Value, opts: &DumpOptions) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    write_value(&mut out, v, opts, 0)?;
    Ok(out)
}

fn newline(out: &mut String, opts: &DumpOptions, depth: usize) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

/// Deepest nesting `tojson` writes. Python's `json.dumps` stops near its recursion limit
/// (1000) too; a template can nest a list in itself in a loop, and without a bound the
/// recursion below overflows the stack (a segfault, not an error).
pub const MAX_DEPTH: usize = 512;

fn write_value(out: &mut String, v: &Value, opts: &DumpOptions, depth: usize) -> Result<(), minijinja::Error> {
    if depth > MAX_DEPTH {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("tojson: value nested more than {MAX_DEPTH} levels deep"),
        ));
    }
    let item_sep = if opts.indent.is_some() { opts.item_sep.trim_end() } else { opts.item_sep.as_str() };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            // Integers as integers (u64/i128 too); a float stays a float even when it is
            // integral (`as_i64` takes 1.0 as 1; Python writes 1.0).
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else if let Ok(f) = f64::try_from(v.clone()) {
                out.push_str(&py_float_repr(f));
            } else {
                out.push_str(&v.to_string());
            }
        }
        ValueKind::String => write_str(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, opts, depth + 1);
                write_value(out, item, opts, depth + 1)?;
            }
            newline(out, opts, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                keys.sort_by_key(|a| a.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, opts, depth + 1);
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => k.to_string(),
                };
                write_str(out, &key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_value(out, &v.get_item(k)?, opts, depth + 1)?;
            }
            newline(out, opts, depth);
            out.push('}');
        }
        _ => write_str(out, &v.to_string(), opts.ensure_ascii),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1.5e-5, "1.5e-05"),
            (1e16, "1e+16"),
            (123456.789, "123456.789"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (-2.5, "-2.5"),
        ] {
            assert_eq!(py_float_repr(f), s);
        }
    }

    #[test]
    fn dumps_like_python() {
        let v = Value::from_serialize_json(r#"{"b": [1, 2.5, "x<&'>é"], "a": {"k": null, "t": true}}"#);
        assert_eq!(
            dumps(&v, &DumpOptions::default()).unwrap(),
            r#"{"b": [1, 2.5, "x<&'>é"], "a": {"k": null, "t": true}}"#
        );
        let ascii = DumpOptions { ensure_ascii: true, ..Default::default() };
        assert!(dumps(&v, &ascii).unwrap().contains("\\u00e9"));
        // Integral floats stay floats, as json.dumps writes them; big integers stay exact.
        let numbers = Value::from_serialize_json("[1.0, -0.0, 1e16, 18446744073709551615, -9223372036854775808]");
        assert_eq!(
            dumps(&numbers, &DumpOptions::default()).unwrap(),
            "[1.0, -0.0, 1e+16, 18446744073709551615, -9223372036854775808]"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let mut v = Value::from(1);
        for _ in 0..MAX_DEPTH {
            v = Value::from(vec![v]);
        }
        let s = dumps(&v, &DumpOptions::default()).unwrap();
        assert_eq!(s.len(), 2 * MAX_DEPTH + 1);
        // One level more is an error; far more (a stack overflow once) too.
        let deeper = Value::from(vec![v]);
        assert!(dumps(&deeper, &DumpOptions::default()).is_err());
        let mut v = deeper;
        for _ in 0..100_000 {
            v = Value::from(vec![v]);
        }
        let err = dumps(&v, &DumpOptions::default()).unwrap_err();
        assert!(err.to_string().contains("nested more than 512 levels"), "{err}");
        // Dropping such a value recurses as deep: leak it rather than overflow the stack.
        std::mem::forget(v);
    }

    trait FromJson {
        fn from_serialize_json(s: &str) -> Value;
    }
    impl FromJson for Value {
        fn from_serialize_json(s: &str) -> Value {
            let j: serde_json::Value = serde_json::from_str(s).unwrap();
            Value::from(minijinja::value::Serde(j))
        }
    }
}
