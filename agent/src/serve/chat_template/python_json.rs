//! `tojson` as Hugging Face's chat-template environment defines it: Python's
//! `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`.
//! minijinja's own `tojson` writes compact JSON and HTML-escapes `<`, `>`, `&` and `'`,
//! which would change every rendered tool schema.

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};
use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};

/// Python's default separators when `indent` is None: `", "` and `": "`.
struct PythonCompact {
    item: String,
    key: String,
}

impl Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(self.item.as_bytes()) }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(self.item.as_bytes()) }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.key.as_bytes())
    }
}

fn to_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
}

fn write_json<T: Serialize, F: Formatter>(value: &T, formatter: F) -> Result<String, Error> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut ser).map_err(to_error)?;
    String::from_utf8(out).map_err(to_error)
}

fn separators(kwargs: &Kwargs, indented: bool) -> Result<(String, String), Error> {
    let default = if indented { (",", ": ") } else { (", ", ": ") };
    let given: Option<Vec<String>> = kwargs.get("separators")?;
    match given.as_deref() {
        None => Ok((default.0.to_owned(), default.1.to_owned())),
        Some([item, key]) => Ok((item.clone(), key.clone())),
        Some(_) => Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
    }
}

/// The `tojson` filter.
pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let (item, key) = separators(&kwargs, indent.is_some())?;
    kwargs.assert_all_used()?;
    let text = if sort_keys.unwrap_or(false) {
        let sorted = sort_recursively(serde_json::to_value(value).map_err(to_error)?);
        dump(&sorted, indent, item, key)?
    } else {
        dump(value, indent, item, key)?
    };
    Ok(Value::from_safe_string(text))
}

fn dump<T: Serialize>(value: &T, indent: Option<usize>, item: String, key: String) -> Result<String, Error> {
    match indent {
        // PrettyFormatter writes "," + newline and ": ", Python's choice with an indent.
        Some(n) => write_json(value, PrettyFormatter::with_indent(" ".repeat(n).as_bytes())),
        None => write_json(value, PythonCompact { item, key }),
    }
}

fn sort_recursively(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().map(|(k, v)| (k, sort_recursively(v))).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(sort_recursively).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ctx` is JSON text, read as template values so maps keep their key order.
    fn render(template: &str, ctx: &str) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson);
        let ctx: Value = serde_json::from_str(ctx).unwrap();
        env.render_str(template, ctx).unwrap()
    }

    #[test]
    fn matches_python_json_dumps() {
        let ctx = r#"{"x": {"b": [1, "<a&b>", null, true], "a": {"k": "é\n"}}}"#;
        // json.dumps({"b": [1, "<a&b>", None, True], "a": {"k": "é\n"}}, ensure_ascii=False)
        assert_eq!(render("{{ x | tojson }}", ctx), r#"{"b": [1, "<a&b>", null, true], "a": {"k": "é\n"}}"#);
        assert_eq!(render("{{ x | tojson(sort_keys=true) }}", ctx), r#"{"a": {"k": "é\n"}, "b": [1, "<a&b>", null, true]}"#);
        assert_eq!(
            render("{{ x.a | tojson(indent=2) }}", ctx),
            "{\n  \"k\": \"é\\n\"\n}"
        );
        assert_eq!(render("{{ x.b | tojson(separators=(',', ':')) }}", ctx), r#"[1,"<a&b>",null,true]"#);
    }
}
