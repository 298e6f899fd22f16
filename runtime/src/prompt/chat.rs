//! A model's own chat template (Hugging Face's `chat_template`, Jinja), rendered with
//! `minijinja` in the environment transformers renders it in
//! (`transformers/utils/chat_template_utils.py`, `_compile_jinja_template`):
//!
//! - `trim_blocks` and `lstrip_blocks` on, the template's single trailing newline dropped;
//! - loop controls (`{% break %}`, `{% continue %}`);
//! - `raise_exception(message)`: rendering fails with that message;
//! - `strftime_now(format)`: the current date and time formatted like Python's `strftime`
//!   (UTC; [`ChatTemplate::with_fixed_time`] pins it for reproducible renders);
//! - the `tojson` filter with `json.dumps` semantics (`ensure_ascii=False`, `sort_keys=False`,
//!   `", "` / `": "` separators, `indent=`), keys in the order the caller gave them;
//! - Python's string / dict / list methods (`.strip()`, `.startswith()`, `.items()`, …) through
//!   `minijinja-contrib`'s pycompat;
//! - the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (and the other
//!   special tokens of `tokenizer_config.json`), plus `tools` / `documents` when given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Name under which a template is compiled (and reported by the engine).
const TEMPLATE_NAME: &str = "chat_template";
/// The file transformers ≥ 4.43 writes the template to beside `tokenizer_config.json`.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// The Hugging Face tokenizer configuration file.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Sentinel of the clock: the system time.
const SYSTEM_CLOCK: i64 = i64::MIN;

/// One chat message (`{"role": …, "content": …}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or a role the template knows, e.g. `tool`).
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    path: PathBuf,
    source: String,
    special_tokens: BTreeMap<String, String>,
    clock: Arc<AtomicI64>,
    strip_leading_bos: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `path` is the file it came from (named by every error).
    /// `special_tokens` maps variable names (`bos_token`, `eos_token`, …) to their text.
    pub fn new(
        source: &str,
        path: impl Into<PathBuf>,
        special_tokens: BTreeMap<String, String>,
    ) -> Result<Self> {
        let path = path.into();
        let clock = Arc::new(AtomicI64::new(SYSTEM_CLOCK));
        let env = environment(source, &path, Arc::clone(&clock))?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            path,
            source: source.to_string(),
            special_tokens,
            clock,
            strip_leading_bos: false,
        })
    }

    /// Renders without the `bos_token` text the template writes first, for text that a
    /// tokenizer adding its own BOS encodes (one BOS, not two).
    #[must_use]
    pub fn with_leading_bos_stripped(mut self, strip: bool) -> Self {
        self.strip_leading_bos = strip;
        self
    }

    /// The template of a model directory: `tokenizer_config.json`'s `chat_template` (a string,
    /// or a list of `{name, template}` from which `name` — default `"default"` — is taken), or
    /// else `chat_template.jinja` beside it. `Ok(None)` when the directory has neither.
    pub fn from_model_dir(dir: &Path, name: Option<&str>) -> Result<Option<Self>> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = if config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| Error::BadLine {
                path: config_path.clone(),
                line: e.line(),
                message: e.to_string(),
            })?
        } else {
            serde_json::Value::Null
        };
        let special_tokens = special_tokens(&config);
        let bad = |message: String| Error::ChatTemplate {
            path: config_path.clone(),
            line: None,
            message,
        };
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let want = name.unwrap_or("default");
                let mut names = Vec::new();
                let mut found = None;
                for item in list {
                    let n = item.get("name").and_then(|v| v.as_str());
                    let t = item.get("template").and_then(|v| v.as_str());
                    match (n, t) {
                        (Some(n), Some(t)) => {
                            if n == want {
                                found = Some(t.to_string());
                            }
                            names.push(n.to_string());
                        }
                        _ => {
                            return Err(bad(
                                "field `chat_template`: expected a list of {\"name\", \"template\"} objects".into(),
                            ))
                        }
                    }
                }
                Some(found.ok_or_else(|| {
                    bad(format!(
                        "field `chat_template`: no template named {want:?}; the file has {}",
                        names.join(", ")
                    ))
                })?)
            }
            Some(other) => {
                return Err(bad(format!(
                    "field `chat_template`: expected a string or a list of {{name, template}}, got {other}"
                )))
            }
        };
        if let Some(source) = source {
            return Self::new(&source, config_path, special_tokens).map(Some);
        }
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Self::new(&source, jinja, special_tokens).map(Some);
        }
        Ok(None)
    }

    /// Pins `strftime_now` to `unix_seconds` (UTC), for renders that must not depend on the day.
    #[must_use]
    pub fn with_fixed_time(self, unix_seconds: i64) -> Self {
        // A fresh clock: templates cloned earlier keep theirs.
        let clock = Arc::new(AtomicI64::new(unix_seconds));
        let env = environment(&self.source, &self.path, Arc::clone(&clock));
        match env {
            Ok(env) => ChatTemplate {
                env: Arc::new(env),
                clock,
                ..self
            },
            // The source compiled once already; it compiles again.
            Err(_) => {
                self.clock.store(unix_seconds, Ordering::Relaxed);
                self
            }
        }
    }

    /// The file the template came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens the template sees (`bos_token`, `eos_token`, …).
    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special_tokens
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with the opening of an
    /// assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = BTreeMap::new();
        ctx.insert(
            "messages".to_string(),
            Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".to_string(),
            Value::from(add_generation_prompt),
        );
        self.render_context(ctx)
    }

    /// Renders with a JSON object as the variables (`messages`, `tools`, `documents`,
    /// `add_generation_prompt`, …; objects keep their key order, as Python dicts do). The
    /// special tokens are added unless the object sets them.
    pub fn render_json(&self, variables: &str) -> Result<String> {
        let value: Value = serde_json::from_str(variables).map_err(|e| Error::ChatTemplate {
            path: self.path.clone(),
            line: None,
            message: format!("the variables are not a JSON object: {e}"),
        })?;
        if value.kind() != ValueKind::Map {
            return Err(Error::ChatTemplate {
                path: self.path.clone(),
                line: None,
                message: format!("the variables are not a JSON object (got {})", value.kind()),
            });
        }
        let mut ctx = BTreeMap::new();
        for key in value.try_iter().map_err(|e| self.error(&e))? {
            let item = value.get_item(&key).map_err(|e| self.error(&e))?;
            ctx.insert(key.to_string(), item);
        }
        self.render_context(ctx)
    }

    fn render_context(&self, mut ctx: BTreeMap<String, Value>) -> Result<String> {
        for (k, v) in &self.special_tokens {
            ctx.entry(k.clone())
                .or_insert_with(|| Value::from(v.as_str()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| self.error(&e))?;
        let text = template.render(ctx).map_err(|e| self.error(&e))?;
        match self.special_tokens.get("bos_token") {
            Some(bos) if self.strip_leading_bos && !bos.is_empty() => Ok(text
                .strip_prefix(bos.as_str())
                .map(str::to_string)
                .unwrap_or(text)),
            _ => Ok(text),
        }
    }

    fn error(&self, e: &minijinja::Error) -> Error {
        template_error(&self.path, e)
    }
}

fn template_error(path: &Path, e: &minijinja::Error) -> Error {
    let message = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) if d.starts_with(RAISED) => {
            format!("the template raised: {}", &d[RAISED.len()..])
        }
        (kind, Some(d)) => format!("{kind}: {d}"),
        (kind, None) => kind.to_string(),
    };
    Error::ChatTemplate {
        path: path.to_path_buf(),
        line: e.line(),
        message,
    }
}

/// Prefix of the error detail of `raise_exception`.
const RAISED: &str = "raise_exception: ";

fn environment(source: &str, path: &Path, clock: Arc<AtomicI64>) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| template_error(path, &e))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{RAISED}{message}"),
            ))
        },
    );
    env.add_function("strftime_now", move |format: String| -> Value {
        let t = clock.load(Ordering::Relaxed);
        let t = if t == SYSTEM_CLOCK {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        } else {
            t
        };
        Value::from(strftime(&format, t))
    });
    env.add_filter("tojson", tojson_filter);
    env.add_template_owned(TEMPLATE_NAME.to_string(), source.to_string())
        .map_err(|e| template_error(path, &e))?;
    Ok(env)
}

/// `bos_token`, `eos_token`, `unk_token`, `pad_token`, … of a `tokenizer_config.json` (a string,
/// or an added-token object with `content`).
fn special_tokens(config: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for key in [
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
    ] {
        let text = match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        if let Some(t) = text {
            out.insert(key.to_string(), t);
        }
    }
    out
}

fn tojson_filter(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                let n = v.as_i64().ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer or a string",
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        },
    };
    let opts = JsonOptions {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, &value, &opts, 0)?;
    Ok(Value::from(out))
}

/// Python `json.dumps` options.
struct JsonOptions {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// Writes `v` as Python's `json.dumps(v, ensure_ascii, indent, sort_keys)` does.
fn write_json(
    out: &mut String,
    v: &Value,
    o: &JsonOptions,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    let item_sep = if o.indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => write_json_string(out, v.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => k.to_string(),
                };
                write_json_string(out, &key, o.ensure_ascii);
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, o, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
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
                newline(out, depth + 1);
                write_json(out, item, o, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {kind} value is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
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
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, fixed notation for exponents in
/// -4..16, scientific (`1e-05`, `1.5e+16`) outside; `NaN`, `Infinity` as `json.dumps` writes them.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: `d.ddde±x`.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python's `datetime.strftime` for `unix_seconds` in UTC, over the directives chat templates
/// use (`%d %b %Y` and the common others); an unknown directive is kept as written.
pub fn strftime(format: &str, unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let month = MONTHS[(m - 1) as usize];
    let wday = WEEKDAYS[weekday];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{y:04}")),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(month),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(wday),
            Some('a') => out.push_str(&wday[..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hh + 11) % 12 + 1)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn tokens() -> BTreeMap<String, String> {
        BTreeMap::from([("eos_token".to_string(), "<|im_end|>".to_string())])
    }

    #[test]
    fn renders_chatml_with_a_generation_prompt() -> Result<()> {
        let t = ChatTemplate::new(CHATML, "t.json", tokens())?;
        let s = t.render(&[ChatMessage::new("user", "Hi")], true)?;
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let s = t.render(&[ChatMessage::new("user", "Hi")], false)?;
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n");
        Ok(())
    }

    #[test]
    fn raise_exception_and_syntax_errors_name_the_file() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
            "dir/tokenizer_config.json",
            BTreeMap::new(),
        )
        .unwrap();
        let e = t
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("dir/tokenizer_config.json"), "{s}");
        assert!(s.contains("first must be user"), "{s}");
        let e = ChatTemplate::new("{% for x in %}", "bad.jinja", BTreeMap::new()).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("bad.jinja") && s.contains("syntax error"), "{s}");
    }

    #[test]
    fn tojson_follows_python_json_dumps() -> Result<()> {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ y | tojson }}",
            "t",
            BTreeMap::new(),
        )?;
        let s = t.render_json(
            r#"{"x": {"b": [1, 2.5, "é<&>"], "a": null, "c": {}}, "y": [0.00001, 1e16, 3.0, true]}"#,
        )?;
        assert_eq!(
            s,
            "{\"b\": [1, 2.5, \"é<&>\"], \"a\": null, \"c\": {}}|{\n  \"b\": [\n    1,\n    2.5,\n    \"é<&>\"\n  ],\n  \"a\": null,\n  \"c\": {}\n}|[1e-05, 1e+16, 3.0, true]"
        );
        Ok(())
    }

    #[test]
    fn the_leading_bos_can_be_left_to_the_tokenizer() -> Result<()> {
        let tokens = BTreeMap::from([("bos_token".to_string(), "<s>".to_string())]);
        let t = ChatTemplate::new("{{ bos_token }}[{{ messages[0].content }}]", "t", tokens)?;
        let m = [ChatMessage::new("user", "x")];
        assert_eq!(t.render(&m, false)?, "<s>[x]");
        assert_eq!(t.with_leading_bos_stripped(true).render(&m, false)?, "[x]");
        Ok(())
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-07-26 12:34:56 UTC, a Friday.
        let t = 1_721_997_296;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %d %H:%M:%S %j %I%p %y %%", t),
            "Friday July 26 12:34:56 208 12PM 24 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn python_string_methods_work() -> Result<()> {
        let t = ChatTemplate::new(
            "{{ s.strip() }}|{% if s.startswith('  a') %}yes{% endif %}|{{ s.split('b')[0] }}|{{ d.items() | list | length }}",
            "t",
            BTreeMap::new(),
        )?;
        assert_eq!(
            t.render_json(r#"{"s": "  abc ", "d": {"k": 1, "j": 2}}"#)?,
            "abc|yes|  a|2"
        );
        Ok(())
    }
}
