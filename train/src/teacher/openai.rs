//! An OpenAI-compatible HTTP endpoint as teacher (vLLM, TGI, llama.cpp's server, a hosted API).
//!
//! Each step is one `POST {base}/v1/completions` (the prompt is the student's plain prompt, after
//! the optional [`TeacherPrompt`] header and demonstrations) or, in chat mode,
//! `POST {base}/v1/chat/completions` (the header as system message, demonstrations and the
//! prompt as user message; the server applies the model's chat template). Generation stops at a
//! newline (the loop keeps the first sentence) and at `max_tokens`; decoding is greedy
//! (temperature 0) unless set.
//!
//! Failures: 429, 5xx, timeouts and connection errors are retried with exponential backoff and
//! jitter (a `Retry-After` header in seconds is honoured instead of the backoff); other 4xx
//! answers fail at once with the status and the server's message; a 2xx answer whose JSON lacks
//! the expected field fails naming the field.
//!
//! Token counting: a remote model's tokenizer is unknown here. Prompts are fitted into
//! [`OpenAiConfig::context`] tokens (when set) counted with the tokenizer given to
//! [`OpenAiTeacher::new`] (e.g. the student's) or, without one, estimated as ⌈chars / 4⌉. The
//! header and demonstrations count against the context; in chat mode
//! [`CHAT_TEMPLATE_ALLOWANCE`] more tokens are held back for the chat template's markup.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};
use steper_runtime::{StepModel, StepOutput, StepRequest};

use super::prompt::{ChatMessage, TeacherPrompt};
use crate::error::{Error, Result};

/// Tokens held back from the context in chat mode for the chat template's role markers.
pub const CHAT_TEMPLATE_ALLOWANCE: usize = 32;

/// Characters per token of the estimate used without a tokenizer.
pub const CHARS_PER_TOKEN: usize = 4;

/// Bytes of a failing response body quoted in errors.
const BODY_QUOTE: usize = 300;

/// Settings of an [`OpenAiTeacher`].
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Server base URL (`http://host:port`; a trailing `/` or `/v1` is accepted).
    pub base_url: String,
    /// The `model` field of each request.
    pub model: String,
    /// Use `/v1/chat/completions` instead of `/v1/completions`.
    pub chat: bool,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Stop sequences (default: a newline).
    pub stop: Vec<String>,
    /// Time limit of one request (connect, send, answer).
    pub timeout: Duration,
    /// Retries after the first attempt for 429, 5xx, timeouts and connection errors.
    pub max_retries: u32,
    /// First backoff; doubled per retry, capped at `backoff_max`, then jittered to 50–100%.
    pub backoff_base: Duration,
    /// Cap on one backoff (and on an honoured `Retry-After`).
    pub backoff_max: Duration,
    /// The teacher's context in tokens (prompt + new tokens); `None`: prompts are not fitted.
    pub context: Option<usize>,
    /// Instruction header and demonstrations prepended for the teacher call.
    pub prompt: Option<TeacherPrompt>,
}

impl OpenAiConfig {
    /// Defaults: completions, greedy, stop at newline, 60 s timeout, 5 retries from 0.5 s up to
    /// 30 s, no context fitting, no header.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        OpenAiConfig {
            base_url: base_url.into(),
            model: model.into(),
            chat: false,
            api_key: None,
            temperature: 0.0,
            stop: vec!["\n".to_string()],
            timeout: Duration::from_secs(60),
            max_retries: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            context: None,
            prompt: None,
        }
    }

    fn endpoint(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        if self.chat {
            format!("{base}/v1/chat/completions")
        } else {
            format!("{base}/v1/completions")
        }
    }
}

/// Request statistics shared by the clones of one teacher.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Requests that got a successful answer.
    pub ok: AtomicU64,
    /// Retries made (after 429, 5xx, timeouts, connection errors).
    pub retries: AtomicU64,
}

/// The OpenAI-compatible teacher. Cloning is cheap (the HTTP agent and the tokenizer are shared),
/// so a distillation can keep one clone per question in flight.
#[derive(Clone)]
pub struct OpenAiTeacher {
    cfg: Arc<OpenAiConfig>,
    endpoint: String,
    name: String,
    agent: ureq::Agent,
    tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    prefix_tokens: usize,
    stats: Arc<RequestStats>,
}

fn backend(message: String) -> steper_runtime::Error {
    steper_runtime::Error::Backend {
        backend: "openai",
        message,
    }
}

/// The first `BODY_QUOTE` bytes of `s` (on a char boundary).
fn quote(s: &str) -> &str {
    let mut end = s.len().min(BODY_QUOTE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What one attempt came to.
enum Attempt {
    Done(String),
    Retry {
        why: String,
        after: Option<Duration>,
    },
    Fail(String),
}

impl OpenAiTeacher {
    /// Checks the settings and builds the HTTP agent. `tokenizer` counts prompt tokens for
    /// context fitting (without it: ⌈chars / 4⌉).
    pub fn new(cfg: OpenAiConfig, tokenizer: Option<tokenizers::Tokenizer>) -> Result<Self> {
        let url = cfg.base_url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::Input(format!(
                "teacher URL {url:?}: expected http://HOST:PORT or https://HOST"
            )));
        }
        if url.starts_with("https://") && !cfg!(feature = "https") {
            return Err(Error::Input(format!(
                "teacher URL {url:?}: https needs steper-train built with `--features https`"
            )));
        }
        if cfg.model.trim().is_empty() {
            return Err(Error::Input(
                "teacher model name is empty (--teacher-model)".into(),
            ));
        }
        if !cfg.temperature.is_finite() || cfg.temperature < 0.0 {
            return Err(Error::Input(format!(
                "teacher temperature must be a finite number ≥ 0, got {}",
                cfg.temperature
            )));
        }
        if cfg.timeout.is_zero() {
            return Err(Error::Input("teacher request timeout must be > 0".into()));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(cfg.timeout))
            .build()
            .into();
        let mut t = OpenAiTeacher {
            endpoint: cfg.endpoint(),
            name: format!("openai:{}", cfg.model),
            cfg: Arc::new(cfg),
            agent,
            tokenizer: tokenizer.map(Arc::new),
            prefix_tokens: 0,
            stats: Arc::new(RequestStats::default()),
        };
        if let Some(p) = &t.cfg.prompt {
            t.prefix_tokens = t.count(&p.prefix()).map_err(Error::Runtime)?;
        }
        if t.cfg.chat {
            t.prefix_tokens += CHAT_TEMPLATE_ALLOWANCE;
        }
        Ok(t)
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Counts shared by every clone of this teacher.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    fn count(&self, text: &str) -> steper_runtime::Result<usize> {
        match &self.tokenizer {
            Some(t) => Ok(t
                .encode(text, false)
                .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))?
                .len()),
            None => Ok(text.chars().count().div_ceil(CHARS_PER_TOKEN)),
        }
    }

    /// The JSON body of the request for a student prompt.
    pub fn request_body(&self, student_prompt: &str, max_tokens: usize) -> Value {
        let cfg = &self.cfg;
        let mut body = if cfg.chat {
            let messages = match &cfg.prompt {
                Some(p) => p.chat_messages(student_prompt),
                None => vec![ChatMessage {
                    role: "user",
                    content: student_prompt.to_string(),
                }],
            };
            json!({ "model": cfg.model, "messages": messages })
        } else {
            let prompt = match &cfg.prompt {
                Some(p) => p.completion_prompt(student_prompt),
                None => student_prompt.to_string(),
            };
            json!({ "model": cfg.model, "prompt": prompt })
        };
        body["max_tokens"] = json!(max_tokens);
        body["temperature"] = json!(cfg.temperature);
        body["stop"] = json!(cfg.stop);
        body["n"] = json!(1);
        body["stream"] = json!(false);
        body
    }

    fn attempt(&self, body: &str) -> Attempt {
        let mut req = self
            .agent
            .post(&self.endpoint)
            .header("Content-Type", "application/json");
        if let Some(k) = &self.cfg.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        match req.send(body) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64);
                let text = match resp.body_mut().read_to_string() {
                    Ok(t) => t,
                    Err(e) if is_transient(&e) => {
                        return Attempt::Retry {
                            why: format!("reading the answer (HTTP {status}): {e}"),
                            after: None,
                        }
                    }
                    Err(e) => {
                        return Attempt::Fail(format!("reading the answer (HTTP {status}): {e}"))
                    }
                };
                match status {
                    200..=299 => Attempt::Done(text),
                    429 | 500..=599 => Attempt::Retry {
                        why: format!("HTTP {status}: {}", server_message(&text)),
                        after: retry_after,
                    },
                    _ => Attempt::Fail(format!(
                        "HTTP {status} (not retried): {}",
                        server_message(&text)
                    )),
                }
            }
            Err(e) if is_transient(&e) => Attempt::Retry {
                why: describe(&e, self.cfg.timeout),
                after: None,
            },
            Err(e) => Attempt::Fail(describe(&e, self.cfg.timeout)),
        }
    }

    /// Sends `body` with retries; returns the 2xx answer's text.
    fn post(&self, body: &Value) -> steper_runtime::Result<String> {
        let body = body.to_string();
        let attempts = self.cfg.max_retries + 1;
        for attempt in 0..attempts {
            match self.attempt(&body) {
                Attempt::Done(text) => {
                    self.stats.ok.fetch_add(1, Ordering::Relaxed);
                    return Ok(text);
                }
                Attempt::Fail(why) => {
                    return Err(backend(format!("POST {}: {why}", self.endpoint)));
                }
                Attempt::Retry { why, after } => {
                    if attempt + 1 == attempts {
                        return Err(backend(format!(
                            "POST {}: gave up after {attempts} attempts; last: {why}",
                            self.endpoint
                        )));
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(self.wait(attempt, after));
                }
            }
        }
        Err(backend(format!(
            "POST {}: no attempt was made (max_retries overflow)",
            self.endpoint
        )))
    }

    /// The pause before retry `attempt + 1`: `Retry-After` if the server sent one (capped),
    /// else `backoff_base · 2^attempt` capped at `backoff_max`, jittered to 50–100%.
    fn wait(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(self.cfg.backoff_max);
        }
        let exp = self
            .cfg
            .backoff_base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cfg.backoff_max);
        exp.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

fn is_transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Timeout(_) | ureq::Error::Io(_) | ureq::Error::ConnectionFailed
    )
}

fn describe(e: &ureq::Error, timeout: Duration) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t}) after {timeout:?}"),
        ureq::Error::Io(io) => format!("connection error: {io}"),
        ureq::Error::ConnectionFailed => "connection failed".to_string(),
        other => other.to_string(),
    }
}

/// The server's `error.message` (OpenAI's error shape) or the start of the body.
fn server_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .or_else(|| v.get("message"))
                .and_then(|m| m.as_str().map(|s| s.to_string()))
        })
        .unwrap_or_else(|| quote(body).to_string())
}

/// The generated text and the server's completion-token count of a 2xx answer.
pub fn parse_response(
    body: &str,
    chat: bool,
) -> std::result::Result<(String, Option<usize>), String> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| format!("answer is not JSON ({e}); body starts: {:?}", quote(body)))?;
    let choice = v
        .get("choices")
        .ok_or("field `choices` missing (expected an array with one choice)")?
        .as_array()
        .ok_or("field `choices` is not an array")?
        .first()
        .ok_or("field `choices` is empty (expected one choice)")?;
    let text = if chat {
        choice
            .pointer("/message/content")
            .ok_or("field `choices[0].message.content` missing (expected a string)")?
            .as_str()
            .ok_or("field `choices[0].message.content` is not a string")?
    } else {
        choice
            .get("text")
            .ok_or("field `choices[0].text` missing (expected a string)")?
            .as_str()
            .ok_or("field `choices[0].text` is not a string")?
    };
    let tokens = v
        .pointer("/usage/completion_tokens")
        .and_then(|t| t.as_u64())
        .map(|t| t as usize);
    Ok((text.to_string(), tokens))
}

impl StepModel for OpenAiTeacher {
    fn name(&self) -> &str {
        &self.name
    }

    fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize> {
        self.cfg
            .context
            .map(|c| c.saturating_sub(max_new_tokens + self.prefix_tokens))
    }

    fn count_tokens(&self, text: &str) -> steper_runtime::Result<usize> {
        self.count(text)
    }

    fn generate(&mut self, req: &StepRequest<'_>) -> steper_runtime::Result<StepOutput> {
        let body = self.request_body(req.prompt, req.max_new_tokens);
        let t0 = Instant::now();
        let answer = self.post(&body)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let (text, tokens) = parse_response(&answer, self.cfg.chat)
            .map_err(|m| backend(format!("POST {}: {m}", self.endpoint)))?;
        let new_tokens = match tokens {
            Some(n) => n,
            None => self.count(&text)?,
        };
        Ok(StepOutput {
            text,
            new_tokens,
            mean_prob: None,
            mean_entropy: None,
            prefilled_tokens: 0,
            reused_tokens: 0,
            prefill_ms: 0.0,
            decode_ms: ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_accepts_trailing_v1_and_slash() {
        for base in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/",
        ] {
            assert_eq!(
                OpenAiConfig::new(base, "m").endpoint(),
                "http://h:1/v1/completions"
            );
        }
        let mut c = OpenAiConfig::new("http://h:1", "m");
        c.chat = true;
        assert_eq!(c.endpoint(), "http://h:1/v1/chat/completions");
    }

    #[test]
    fn parse_names_the_missing_field() {
        let e = parse_response(r#"{"choices":[{"txt":"a"}]}"#, false).unwrap_err();
        assert!(e.contains("choices[0].text"), "{e}");
        let e = parse_response(r#"{"choices":[{"message":{}}]}"#, true).unwrap_err();
        assert!(e.contains("choices[0].message.content"), "{e}");
        let e = parse_response(r#"{"choices":[]}"#, false).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = parse_response("<html>", false).unwrap_err();
        assert!(e.contains("not JSON") && e.contains("<html>"), "{e}");
        let (t, n) = parse_response(
            r#"{"choices":[{"text":" A b."}],"usage":{"completion_tokens":3}}"#,
            false,
        )
        .unwrap();
        assert_eq!((t.as_str(), n), (" A b.", Some(3)));
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let mut c = OpenAiConfig::new("http://h:1", "m");
        c.backoff_base = Duration::from_millis(100);
        c.backoff_max = Duration::from_millis(350);
        let t = OpenAiTeacher::new(c, None).unwrap();
        for (attempt, full) in [(0, 100u64), (1, 200), (2, 350), (10, 350)] {
            let w = t.wait(attempt, None);
            let full = Duration::from_millis(full);
            assert!(w <= full && w >= full / 2, "attempt {attempt}: {w:?}");
        }
        assert_eq!(
            t.wait(0, Some(Duration::from_millis(120))),
            Duration::from_millis(120)
        );
        assert_eq!(
            t.wait(0, Some(Duration::from_secs(9))),
            Duration::from_millis(350)
        );
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(OpenAiTeacher::new(OpenAiConfig::new("ftp://x", "m"), None).is_err());
        assert!(OpenAiTeacher::new(OpenAiConfig::new("http://x", " "), None).is_err());
        let mut c = OpenAiConfig::new("http://x", "m");
        c.temperature = f32::NAN;
        assert!(OpenAiTeacher::new(c, None).is_err());
    }

    #[test]
    fn budget_counts_header_and_chat_allowance() {
        let mut c = OpenAiConfig::new("http://x", "m");
        c.context = Some(2048);
        c.prompt = Some(TeacherPrompt::parse("[instruction]\nabcdefgh\n", "f").unwrap());
        // "abcdefgh\n\n" = 10 chars → 3 tokens by the chars/4 estimate.
        let t = OpenAiTeacher::new(c.clone(), None).unwrap();
        assert_eq!(t.prompt_budget(48), Some(2048 - 48 - 3));
        c.chat = true;
        let t = OpenAiTeacher::new(c, None).unwrap();
        assert_eq!(
            t.prompt_budget(48),
            Some(2048 - 48 - 3 - CHAT_TEMPLATE_ALLOWANCE)
        );
        assert_eq!(t.count_tokens("abcde").unwrap(), 2);
    }
}
