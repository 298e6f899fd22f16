//! Request and response bodies of the HTTP API, and the checks that turn a malformed body into
//! a 400 that names the field.
//!
//! Bodies are parsed into a `serde_json::Value` first and then read field by field, so every
//! error says which field is wrong and what was expected (serde's derive reports a line and
//! column, not the field, for a wrong type).

use serde::Serialize;
use serde_json::{Map, Value};

use super::metrics::ErrorKind;

/// Longest question accepted (characters); longer ones are a 400, not a context overflow deep in
/// the model.
pub const MAX_QUESTION_CHARS: usize = 4000;
/// Most stop sequences in one completion request (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Most alternatives per position in `logprobs` (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 5;

/// An error answered to the client: the status comes from the kind; the body is OpenAI's error
/// shape `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// What went wrong (also the metric label and the `type` field).
    pub kind: ErrorKind,
    /// A message for people.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// A 400 about `field`.
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        ApiError {
            kind: ErrorKind::BadRequest,
            message: format!("field `{field}`: {message}"),
            param: Some(field.to_string()),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind.label(),
                "param": self.param,
                "code": self.kind.status(),
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind.status(),
            self.kind.label(),
            self.message
        )
    }
}

/// Parses a body into a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            "the request body is empty; expected a JSON object",
        ));
    }
    if let Err(e) = std::str::from_utf8(body) {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            format!(
                "the request body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("expected a JSON object, got {}", type_name(&other)),
        )),
        Err(e) => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads fields of one object, remembering which were read so unknown ones can be reported.
pub(super) struct Fields<'a> {
    pub(super) map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(super) fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    pub(super) fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::field(
                name,
                format!("expected a string, got {}", type_name(v)),
            )),
        }
    }

    pub(super) fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::field(
                name,
                format!("expected true or false, got {}", type_name(v)),
            )),
        }
    }

    /// An integer in `min..=max`.
    pub(super) fn uint(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(u) if (min..=max).contains(&u) => Ok(Some(u)),
                _ => Err(ApiError::field(
                    name,
                    format!("expected an integer from {min} to {max}, got {n}"),
                )),
            },
            Some(v) => Err(ApiError::field(
                name,
                format!(
                    "expected an integer from {min} to {max}, got {}",
                    type_name(v)
                ),
            )),
        }
    }

    /// A finite number in `min..=max`.
    fn number(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x.is_finite() && (min..=max).contains(&x) => Ok(Some(x)),
                _ => Err(ApiError::field(
                    name,
                    format!("expected a number from {min} to {max}, got {n}"),
                )),
            },
            Some(v) => Err(ApiError::field(
                name,
                format!(
                    "expected a number from {min} to {max}, got {}",
                    type_name(v)
                ),
            )),
        }
    }

    fn reject_unknown(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(ApiError::field(
                k,
                format!("unknown field; expected one of {}", known.join(", ")),
            )),
            None => Ok(()),
        }
    }
}

/// `POST /v1/reason`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasonRequest {
    /// The question.
    pub question: String,
    /// Steps before forced aggregation (default: the model's).
    pub max_steps: Option<usize>,
    /// Passages per step (default: the model's).
    pub top_k: Option<usize>,
    /// Include the per-step trace in the answer (default true).
    pub include_trace: bool,
    /// Send server-sent events, one per step, then the answer.
    pub stream: bool,
}

/// Largest `max_steps` a request may ask for.
pub const MAX_STEPS_LIMIT: u64 = 16;
/// Largest `top_k` a request may ask for.
pub const TOP_K_LIMIT: u64 = 32;

impl ReasonRequest {
    /// Reads and checks a body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let map = parse_object(body)?;
        let f = Fields { map: &map };
        f.reject_unknown(&["question", "max_steps", "top_k", "include_trace", "stream"])?;
        let question = f
            .string("question")?
            .ok_or_else(|| ApiError::field("question", "missing; expected a string"))?;
        if question.trim().is_empty() {
            return Err(ApiError::field("question", "is empty"));
        }
        if question.chars().count() > MAX_QUESTION_CHARS {
            return Err(ApiError::field(
                "question",
                format!("longer than {MAX_QUESTION_CHARS} characters"),
            ));
        }
        Ok(ReasonRequest {
            question: question.to_string(),
            max_steps: f.uint("max_steps", 1, MAX_STEPS_LIMIT)?.map(|v| v as usize),
            top_k: f.uint("top_k", 0, TOP_K_LIMIT)?.map(|v| v as usize),
            include_trace: f.bool("include_trace")?.unwrap_or(true),
            stream: f.bool("stream")?.unwrap_or(false),
        })
    }
}

/// `POST /v1/completions` (the OpenAI legacy completions request; fields this service does not
/// implement with a different meaning — `n`, `best_of`, `echo`, `suffix` — are refused when
/// set to anything but their default; other OpenAI fields are accepted and ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The prompt (a string, or an array holding one string).
    pub prompt: String,
    /// Tokens to generate at most (default 16, as OpenAI).
    pub max_tokens: usize,
    /// 0 = greedy (default 1, as OpenAI).
    pub temperature: f32,
    /// Generation stops before any of these (at most 4).
    pub stop: Vec<String>,
    /// Stream tokens as server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a last streamed chunk carries `usage`.
    pub include_usage: bool,
    /// Return this many top log-probabilities per token.
    pub logprobs: Option<usize>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// The model name echoed back (default: the served model's).
    pub model: Option<String>,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches this
    /// (default 1: the whole vocabulary).
    pub top_p: f32,
    /// Whether the tokenizer adds its special tokens (BOS) to the prompt: true for plain
    /// completions, false for chat prompts, whose template writes them (as transformers
    /// tokenizes the output of `apply_chat_template`).
    pub add_special_tokens: bool,
}

/// Largest `max_tokens` a request may ask for.
pub const MAX_TOKENS_LIMIT: u64 = 4096;
/// Default `max_tokens` (OpenAI's).
pub const DEFAULT_MAX_TOKENS: usize = 16;

impl CompletionRequest {
    /// Reads and checks a body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let map = parse_object(body)?;
        Self::from_object(&map)
    }

    /// Reads and checks a parsed body.
    pub(super) fn from_object(map: &Map<String, Value>) -> Result<Self, ApiError> {
        let f = Fields { map };
        let prompt = match f.get("prompt") {
            None => return Err(ApiError::field("prompt", "missing; expected a string")),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
                Value::String(s) => s.clone(),
                v => {
                    return Err(ApiError::field(
                        "prompt",
                        format!("expected an array of one string, got {}", type_name(v)),
                    ))
                }
            },
            Some(Value::Array(a)) => {
                return Err(ApiError::field(
                    "prompt",
                    format!(
                        "batches are not served: expected one string, got an array of {}",
                        a.len()
                    ),
                ))
            }
            Some(v) => {
                return Err(ApiError::field(
                    "prompt",
                    format!("expected a string, got {}", type_name(v)),
                ))
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::field("prompt", "is empty"));
        }
        let stop = match f.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => {
                if a.len() > MAX_STOP_SEQUENCES {
                    return Err(ApiError::field(
                        "stop",
                        format!("at most {MAX_STOP_SEQUENCES} sequences, got {}", a.len()),
                    ));
                }
                a.iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        v => Err(ApiError::field(
                            "stop",
                            format!("expected strings, got {}", type_name(v)),
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(v) => {
                return Err(ApiError::field(
                    "stop",
                    format!(
                        "expected a string or an array of strings, got {}",
                        type_name(v)
                    ),
                ))
            }
        };
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        if let Some(n) = f.uint("n", 0, u64::MAX)? {
            if n != 1 {
                return Err(ApiError::field("n", format!("only 1 is served, got {n}")));
            }
        }
        if let Some(n) = f.uint("best_of", 0, u64::MAX)? {
            if n != 1 {
                return Err(ApiError::field(
                    "best_of",
                    format!("only 1 is served, got {n}"),
                ));
            }
        }
        if f.bool("echo")? == Some(true) {
            return Err(ApiError::field("echo", "echo is not served"));
        }
        if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::field("suffix", "suffix is not served"));
        }
        let top_p = f.number("top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
        // Accepted and ignored; still type-checked.
        f.number("presence_penalty", -2.0, 2.0)?;
        f.number("frequency_penalty", -2.0, 2.0)?;
        f.string("user")?;
        let include_usage = match f.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ApiError::field(
                        "stream_options.include_usage",
                        format!("expected true or false, got {}", type_name(v)),
                    ))
                }
            },
            Some(v) => {
                return Err(ApiError::field(
                    "stream_options",
                    format!("expected an object, got {}", type_name(v)),
                ))
            }
        };
        Ok(CompletionRequest {
            include_usage,
            prompt,
            max_tokens: f
                .uint("max_tokens", 0, MAX_TOKENS_LIMIT)?
                .map(|v| v as usize)
                .unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: f.number("temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
            stop,
            stream: f.bool("stream")?.unwrap_or(false),
            logprobs: f
                .uint("logprobs", 0, MAX_LOGPROBS as u64)?
                .map(|v| v as usize),
            seed: f.uint("seed", 0, u64::MAX)?,
            model: f.string("model")?.map(str::to_string),
            top_p,
            add_special_tokens: true,
        })
    }
}

/// OpenAI's `logprobs` object of a completion choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    /// Generated tokens as text.
    pub tokens: Vec<String>,
    /// Natural-log probability of each token.
    pub token_logprobs: Vec<f64>,
    /// Per position, the most probable alternatives (token text → log-probability).
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    /// Character offset of each token in the prompt + completion text.
    pub text_offset: Vec<usize>,
}

/// One choice of a completion response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionChoice {
    /// Generated text (or, streaming, the new piece).
    pub text: String,
    /// Always 0 (one choice).
    pub index: usize,
    /// Log-probabilities when asked for, else `null`.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` (EOS or a stop sequence), `length` (`max_tokens`), or `null` mid-stream.
    pub finish_reason: Option<&'static str>,
}

/// Token counts of a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CompletionUsage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// A completion response (OpenAI's `text_completion` object); streaming chunks have the same
/// shape without `usage`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model name.
    pub model: String,
    /// One choice.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (absent on streaming chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<CompletionUsage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason_err(body: &str) -> ApiError {
        ReasonRequest::parse(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn reason_request_defaults_and_fields() {
        let r = ReasonRequest::parse(br#"{"question":"Who?"}"#).unwrap();
        assert_eq!(r.question, "Who?");
        assert!(r.include_trace && !r.stream);
        assert_eq!((r.max_steps, r.top_k), (None, None));
        let r = ReasonRequest::parse(
            br#"{"question":"Who?","max_steps":3,"top_k":2,"include_trace":false,"stream":true}"#,
        )
        .unwrap();
        assert_eq!((r.max_steps, r.top_k), (Some(3), Some(2)));
        assert!(!r.include_trace && r.stream);
    }

    #[test]
    fn reason_errors_name_the_field() {
        for (body, field) in [
            (r#"{"question":5}"#, "question"),
            (r#"{}"#, "question"),
            (r#"{"question":"  "}"#, "question"),
            (r#"{"question":"q","max_steps":"3"}"#, "max_steps"),
            (r#"{"question":"q","max_steps":0}"#, "max_steps"),
            (r#"{"question":"q","max_steps":2.5}"#, "max_steps"),
            (r#"{"question":"q","top_k":-1}"#, "top_k"),
            (r#"{"question":"q","stream":"yes"}"#, "stream"),
            (r#"{"question":"q","include_trace":1}"#, "include_trace"),
            (r#"{"question":"q","qestion":"typo"}"#, "qestion"),
        ] {
            let e = reason_err(body);
            assert_eq!(e.kind, ErrorKind::BadRequest, "{body}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e}");
            assert!(e.message.contains(field), "{body}: {e}");
        }
    }

    #[test]
    fn malformed_bodies_are_400_without_a_field() {
        for body in [
            &b""[..],
            b"{",
            b"[1,2]",
            b"\"question\"",
            b"{\"question\":\"\xff\xfe\"}",
            b"nul",
        ] {
            let e = ReasonRequest::parse(body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert_eq!(e.param, None, "{e}");
        }
        let e = ReasonRequest::parse(b"{\"question\":\"\xff\"}").unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn completion_request_follows_openai_defaults() {
        let c = CompletionRequest::parse(br#"{"prompt":"Hi","model":"x","top_p":1}"#).unwrap();
        assert_eq!(c.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(c.temperature, 1.0);
        assert!(c.stop.is_empty() && !c.stream && c.logprobs.is_none());
        let c = CompletionRequest::parse(
            br#"{"prompt":["Hi"],"max_tokens":5,"temperature":0,"stop":["\n",""],"logprobs":2,"n":1}"#,
        )
        .unwrap();
        assert_eq!(c.prompt, "Hi");
        assert_eq!(c.stop, vec!["\n".to_string()]);
        assert_eq!((c.max_tokens, c.logprobs), (5, Some(2)));
        let c = CompletionRequest::parse(br#"{"prompt":"Hi","stop":"."}"#).unwrap();
        assert_eq!(c.stop, vec![".".to_string()]);
    }

    #[test]
    fn completion_errors_name_the_field() {
        for (body, field) in [
            (r#"{"max_tokens":3}"#, "prompt"),
            (r#"{"prompt":7}"#, "prompt"),
            (r#"{"prompt":["a","b"]}"#, "prompt"),
            (r#"{"prompt":"a","max_tokens":"3"}"#, "max_tokens"),
            (r#"{"prompt":"a","max_tokens":100000}"#, "max_tokens"),
            (r#"{"prompt":"a","temperature":3}"#, "temperature"),
            (r#"{"prompt":"a","stop":[1]}"#, "stop"),
            (r#"{"prompt":"a","stop":["a","b","c","d","e"]}"#, "stop"),
            (r#"{"prompt":"a","n":2}"#, "n"),
            (r#"{"prompt":"a","echo":true}"#, "echo"),
            (r#"{"prompt":"a","logprobs":9}"#, "logprobs"),
            (r#"{"prompt":"a","stream":0}"#, "stream"),
        ] {
            let e = CompletionRequest::parse(body.as_bytes()).expect_err(body);
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e}");
        }
    }

    #[test]
    fn error_body_has_the_openai_shape() {
        let b = ApiError::field("top_k", "bad").body();
        assert_eq!(b["error"]["param"], "top_k");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], 400);
        assert!(b["error"]["message"].as_str().unwrap().contains("top_k"));
    }
}
