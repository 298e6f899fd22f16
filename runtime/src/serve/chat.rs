//! `POST /v1/chat/completions` (OpenAI's chat completions) and `GET /v1/models`: the request
//! read field by field, the messages rendered with the model's chat template on the worker, the
//! completion run as `/v1/completions` runs it, the response and stream chunks in OpenAI's shapes.

use serde::Serialize;
use serde_json::{Map, Value};

use super::api::{
    parse_object, type_name, ApiError, CompletionLogprobs, CompletionRequest, Fields,
};
use crate::prompt::ChatMessage;

/// Most messages in one chat request.
pub const MAX_MESSAGES: usize = 256;
/// Most alternatives per position in chat `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// A chat completion request: the messages and the sampling settings of a completion (whose
/// `prompt` is filled by rendering the messages).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `stop`, `stream`,
    /// `stream_options`, `seed`, `model`; `logprobs` holds `top_logprobs` when `logprobs` is true.
    pub completion: CompletionRequest,
    /// Whether per-token log-probabilities were asked for (`logprobs: true`).
    pub logprobs: bool,
}

/// Fields of the chat request that the completion request does not have (or has with another
/// type); everything else is read as `/v1/completions` reads it.
const CHAT_ONLY: [&str; 8] = [
    "messages",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
    "n",
];

impl ChatRequest {
    /// Reads and checks a body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let map = parse_object(body)?;
        let f = Fields { map: &map };
        let messages = match f.get("messages") {
            None => {
                return Err(ApiError::field(
                    "messages",
                    "missing; expected an array of {role, content}",
                ))
            }
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(ApiError::field("messages", "is empty"))
            }
            Some(Value::Array(a)) if a.len() > MAX_MESSAGES => {
                return Err(ApiError::field(
                    "messages",
                    format!("at most {MAX_MESSAGES} messages, got {}", a.len()),
                ))
            }
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, m)| message(i, m))
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => {
                return Err(ApiError::field(
                    "messages",
                    format!(
                        "expected an array of {{role, content}}, got {}",
                        type_name(v)
                    ),
                ))
            }
        };
        if f.get("tools")
            .is_some_and(|t| !matches!(t, Value::Array(a) if a.is_empty()))
        {
            return Err(ApiError::field("tools", "tool calls are not served"));
        }
        if let Some(n) = f.uint("n", 0, u64::MAX)? {
            if n != 1 {
                return Err(ApiError::field("n", format!("only 1 is served, got {n}")));
            }
        }
        let logprobs = f.bool("logprobs")?.unwrap_or(false);
        let top = f.uint("top_logprobs", 0, MAX_TOP_LOGPROBS)?;
        if top.is_some() && !logprobs {
            return Err(ApiError::field("top_logprobs", "needs `logprobs: true`"));
        }
        let max_completion = f.uint("max_completion_tokens", 0, super::api::MAX_TOKENS_LIMIT)?;
        let mut rest: Map<String, Value> = map
            .iter()
            .filter(|(k, _)| !CHAT_ONLY.contains(&k.as_str()) && k.as_str() != "tools")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // A placeholder: the worker renders the messages into the prompt.
        rest.insert("prompt".into(), Value::String(" ".into()));
        if let (Some(n), false) = (max_completion, rest.contains_key("max_tokens")) {
            rest.insert("max_tokens".into(), Value::from(n));
        }
        if logprobs {
            rest.insert(
                "logprobs".into(),
                Value::from(top.unwrap_or(0).min(super::api::MAX_LOGPROBS as u64)),
            );
        }
        let mut completion = CompletionRequest::from_object(&rest)?;
        completion.add_special_tokens = false;
        if max_completion.is_none() && !map.contains_key("max_tokens") {
            // OpenAI's chat default is "until the model stops"; bounded by the context.
            completion.max_tokens = super::api::MAX_TOKENS_LIMIT as usize;
        }
        Ok(ChatRequest {
            messages,
            completion,
            logprobs,
        })
    }
}

/// One message: `role` a string, `content` a string or an array of `{type: "text", text}` parts.
fn message(i: usize, m: &Value) -> Result<ChatMessage, ApiError> {
    let field = |name: &str| format!("messages[{i}].{name}");
    let Value::Object(o) = m else {
        return Err(ApiError::field(
            &format!("messages[{i}]"),
            format!("expected an object {{role, content}}, got {}", type_name(m)),
        ));
    };
    let role = match o.get("role") {
        Some(Value::String(r)) if !r.is_empty() => r.clone(),
        Some(v) => {
            return Err(ApiError::field(
                &field("role"),
                format!("expected a non-empty string, got {}", type_name(v)),
            ))
        }
        None => {
            return Err(ApiError::field(
                &field("role"),
                "missing; expected a string",
            ))
        }
    };
    let content = match o.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => {
                        return Err(ApiError::field(
                            &format!("messages[{i}].content[{j}]"),
                            "expected a text part {\"type\": \"text\", \"text\": …}",
                        ))
                    }
                }
            }
            text
        }
        Some(v) => {
            return Err(ApiError::field(
                &field("content"),
                format!(
                    "expected a string or an array of text parts, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    Ok(ChatMessage { role, content })
}

/// The assistant message of a choice (or, streaming, the delta).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatDelta {
    /// `assistant` (in the first chunk of a stream and in a full response).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Text (absent in the last chunk of a stream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One alternative token of a chat `logprobs` entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTopLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f64,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated token of a chat `logprobs.content`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f64,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most probable alternatives at this position.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// OpenAI's chat `logprobs` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

impl From<CompletionLogprobs> for ChatLogprobs {
    fn from(lp: CompletionLogprobs) -> Self {
        let content = lp
            .tokens
            .into_iter()
            .zip(lp.token_logprobs)
            .zip(lp.top_logprobs)
            .map(|((token, logprob), top)| ChatTokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob,
                top_logprobs: top
                    .into_iter()
                    .map(|(t, v)| ChatTopLogprob {
                        bytes: t.as_bytes().to_vec(),
                        logprob: v.as_f64().unwrap_or(f64::NEG_INFINITY),
                        token: t,
                    })
                    .collect(),
            })
            .collect();
        ChatLogprobs { content }
    }
}

/// One choice of a chat completion (`message`) or of a stream chunk (`delta`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: usize,
    /// The full message (responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatDelta>,
    /// The new piece (stream chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatDelta>,
    /// Log-probabilities when asked for, else `null`.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length`, or `null` mid-stream.
    pub finish_reason: Option<&'static str>,
}

/// A chat completion (`chat.completion`) or a stream chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model name.
    pub model: String,
    /// One choice (none in a usage-only chunk).
    pub choices: Vec<ChatChoice>,
    /// Token counts (responses, and the last chunk with `stream_options.include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<super::api::CompletionUsage>,
}

/// `GET /v1/models`: OpenAI's list with the one served model.
pub fn models_body(model: &str, created: u64) -> Value {
    serde_json::json!({
        "object": "list",
        "data": [{
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "steper",
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request_reads_messages_and_sampling() {
        let r = ChatRequest::parse(
            br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}],"max_completion_tokens":7,"temperature":0.5,"top_p":0.9,"stop":"\n","seed":3,"logprobs":true,"top_logprobs":2,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages,
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi")
            ]
        );
        let c = &r.completion;
        assert_eq!((c.max_tokens, c.logprobs, c.seed), (7, Some(2), Some(3)));
        assert_eq!((c.temperature, c.top_p), (0.5, 0.9));
        assert!(c.stream && !c.add_special_tokens && r.logprobs);
        assert_eq!(c.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn chat_errors_name_the_field() {
        for (body, field) in [
            (r#"{}"#, "messages"),
            (r#"{"messages":"hi"}"#, "messages"),
            (r#"{"messages":[]}"#, "messages"),
            (r#"{"messages":[5]}"#, "messages[0]"),
            (r#"{"messages":[{"content":"x"}]}"#, "messages[0].role"),
            (
                r#"{"messages":[{"role":"user","content":3}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0].content[0]",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"3"}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":9}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":2}"#,
                "top_p",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logprobs":1}"#,
                "logprobs",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                "top_logprobs",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":3}"#, "n"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{}]}"#,
                "tools",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                "stream",
            ),
        ] {
            let e = ChatRequest::parse(body.as_bytes()).expect_err(body);
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e}");
        }
    }
}
