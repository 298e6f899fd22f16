//! The one prompt template (docs/DESIGN.md, "The prompt"), shared by teacher, trainer and runtime.
//!
//! IRCoT's layout, passages first so that a step only appends:
//!
//! ```text
//! Wikipedia Title: {title}
//! {text, capped at N words}
//!
//! Q: {question}
//! A: {r_1} {r_2} ... {r_(s-1)}
//! ```
//!
//! With no reasoning yet the prompt ends in `A:`; every sentence (prior or target) follows a
//! single space, so the continuation a model learns and generates is `" " + sentence`. Rendering
//! is a pure concatenation: adding passages (after earlier ones) or sentences keeps everything
//! before the new text unchanged, which is what cross-step KV reuse relies on.
//!
//! Two formats ([`PromptFormat`], `--prompt-format`, recorded in `steper.json`), rendered by one
//! function ([`PromptLayout::render`]) for the teachers, the trainer, calibration and the
//! runtime alike:
//!
//! - `plain` (the default): the layout above as raw text;
//! - `chat`: the model's own chat template ([`chat::ChatTemplate`]) rendered with one user
//!   message holding the passages and `Q: {question}`, with `add_generation_prompt`, followed by
//!   `A:` and the reasoning so far as the start of the assistant turn:
//!
//! ```text
//! <template's opening>{passages}Q: {question}<end of user turn, assistant header>A: {r_1} ...
//! ```
//!
//! The continuation is `" " + sentence` in both formats. Across steps the chat prompt changes
//! where the plain one does (after the passages held before); what it re-prefills beyond that is
//! the template's markup between the question and `A:` (a handful of tokens per step).
//!
//! The loop's second framework, Self-Ask (question decomposition, [`Framework::SelfAsk`]), has its
//! own layout in both formats (passages first too, then `Question:`, the follow-ups and their
//! intermediate answers), rendered by [`PromptLayout::render_for`] and [`PromptLayout::fit_for`].

pub mod chat;
mod framework;
pub(crate) mod self_ask;

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::data::PromptPassage;
use crate::error::{Error, Result};
pub use chat::{ChatMessage, ChatTemplate};
pub use framework::Framework;

/// How step prompts are laid out: the switch `--prompt-format plain|chat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptFormat {
    /// The IRCoT layout as raw text.
    #[default]
    Plain,
    /// The IRCoT layout inside the model's chat template.
    Chat,
}

impl PromptFormat {
    /// The name on the command line and in `steper.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            PromptFormat::Plain => "plain",
            PromptFormat::Chat => "chat",
        }
    }

    /// Whether this is [`PromptFormat::Plain`] (`steper.json` leaves the default out).
    pub fn is_plain(&self) -> bool {
        *self == PromptFormat::Plain
    }
}

impl std::fmt::Display for PromptFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PromptFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "plain" => Ok(PromptFormat::Plain),
            "chat" => Ok(PromptFormat::Chat),
            other => Err(Error::InvalidOption {
                option: "prompt-format".into(),
                expected: "plain or chat".into(),
                got: other.into(),
            }),
        }
    }
}

/// A [`PromptFormat`] with what it needs to render: for `chat`, the model's template.
#[derive(Debug, Clone, Default)]
pub enum PromptLayout {
    /// [`PromptFormat::Plain`].
    #[default]
    Plain,
    /// [`PromptFormat::Chat`] with the template.
    Chat(Arc<ChatTemplate>),
}

impl PartialEq for PromptLayout {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PromptLayout::Plain, PromptLayout::Plain) => true,
            (PromptLayout::Chat(a), PromptLayout::Chat(b)) => {
                a.source() == b.source() && a.special_tokens() == b.special_tokens()
            }
            _ => false,
        }
    }
}

impl PromptLayout {
    /// The chat layout over `template`.
    pub fn chat(template: ChatTemplate) -> Self {
        PromptLayout::Chat(Arc::new(template))
    }

    /// The layout of `format` for the model in `model_dir` (its `tokenizer_config.json` or
    /// `chat_template.jinja` for `chat`; an error naming the directory when it has no template).
    pub fn load(format: PromptFormat, model_dir: &Path) -> Result<Self> {
        match format {
            PromptFormat::Plain => Ok(PromptLayout::Plain),
            PromptFormat::Chat => match ChatTemplate::from_model_dir(model_dir, None)? {
                Some(t) => Ok(PromptLayout::chat(t)),
                None => Err(Error::ChatTemplate {
                    path: model_dir.to_path_buf(),
                    line: None,
                    message: format!(
                        "--prompt-format chat needs the model's chat template: neither `chat_template` in {} nor {} was found",
                        chat::TOKENIZER_CONFIG_FILE,
                        chat::CHAT_TEMPLATE_FILE
                    ),
                }),
            },
        }
    }

    /// The format.
    pub fn format(&self) -> PromptFormat {
        match self {
            PromptLayout::Plain => PromptFormat::Plain,
            PromptLayout::Chat(_) => PromptFormat::Chat,
        }
    }

    /// The chat template, for the chat layout.
    pub fn template(&self) -> Option<&ChatTemplate> {
        match self {
            PromptLayout::Plain => None,
            PromptLayout::Chat(t) => Some(t),
        }
    }

    /// The step prompt for `question`, the passages held, the prior sentences and the forced
    /// `suffix` (`So the answer is:`), each passage text capped at `word_cap` words.
    pub fn render(
        &self,
        question: &str,
        passages: &[PromptPassage],
        reasoning: &[String],
        word_cap: usize,
        suffix: Option<&str>,
    ) -> Result<String> {
        self.render_for(
            Framework::Ircot,
            question,
            passages,
            reasoning,
            word_cap,
            suffix,
        )
    }

    /// The step prompt of `framework` (see [`PromptLayout::render`] for IRCoT's; for Self-Ask
    /// `reasoning` holds the prior steps, each a follow-up and its intermediate answer, and
    /// `suffix` what ends the prompt: the pending follow-up with `Intermediate answer:`, or
    /// `So the final answer is:`).
    pub fn render_for(
        &self,
        framework: Framework,
        question: &str,
        passages: &[PromptPassage],
        reasoning: &[String],
        word_cap: usize,
        suffix: Option<&str>,
    ) -> Result<String> {
        let caps = vec![word_cap; passages.len()];
        self.render_parts(framework, question, passages, &caps, reasoning, suffix)
    }

    /// [`PromptLayout::render`] fitted to `budget` tokens by `count_tokens`, as [`fit`] does.
    #[allow(clippy::too_many_arguments)]
    pub fn fit(
        &self,
        question: &str,
        passages: &[PromptPassage],
        reasoning: &[String],
        suffix: Option<&str>,
        word_cap: usize,
        budget: usize,
        count_tokens: impl FnMut(&str) -> Result<usize>,
    ) -> Result<FittedPrompt> {
        self.fit_for(
            Framework::Ircot,
            question,
            passages,
            reasoning,
            suffix,
            word_cap,
            budget,
            count_tokens,
        )
    }

    /// [`PromptLayout::render_for`] fitted to `budget` tokens by `count_tokens`, as [`fit`]
    /// does: passage words first, then whole passages; the question and the steps are never cut.
    #[allow(clippy::too_many_arguments)]
    pub fn fit_for(
        &self,
        framework: Framework,
        question: &str,
        passages: &[PromptPassage],
        reasoning: &[String],
        suffix: Option<&str>,
        word_cap: usize,
        budget: usize,
        count_tokens: impl FnMut(&str) -> Result<usize>,
    ) -> Result<FittedPrompt> {
        fit_parts(
            self,
            framework,
            question,
            passages,
            reasoning,
            suffix,
            word_cap,
            budget,
            count_tokens,
        )
    }

    fn render_parts(
        &self,
        framework: Framework,
        question: &str,
        passages: &[PromptPassage],
        caps: &[usize],
        reasoning: &[String],
        suffix: Option<&str>,
    ) -> Result<String> {
        match (self, framework) {
            (PromptLayout::Plain, Framework::SelfAsk) => Ok(self_ask::render_plain(
                question, passages, caps, reasoning, suffix,
            )),
            (PromptLayout::Chat(t), Framework::SelfAsk) => {
                self_ask::render_chat(t, question, passages, caps, reasoning, suffix)
            }
            (PromptLayout::Plain, Framework::Ircot) => {
                Ok(render_parts(question, passages, caps, reasoning, suffix))
            }
            (PromptLayout::Chat(t), Framework::Ircot) => {
                let mut user = String::new();
                push_passages(&mut user, passages, caps);
                user.push_str("Q: ");
                user.push_str(question.trim());
                let mut s = t.render(&[ChatMessage::new("user", user)], true)?;
                s.push_str("A:");
                push_reasoning(&mut s, reasoning, suffix);
                Ok(s)
            }
        }
    }
}

/// Template identifier, equal to [`crate::manifest::TEMPLATE_VERSION`].
pub const TEMPLATE: &str = crate::manifest::TEMPLATE_VERSION;

/// Default cap on words kept per passage text.
pub const DEFAULT_WORD_CAP: usize = 100;

/// The first `cap` whitespace-separated words of `text`, joined by single spaces.
pub fn cap_words(text: &str, cap: usize) -> String {
    text.split_whitespace()
        .take(cap)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Renders the prompt for `question`, the passages held (in the order they were retrieved),
/// the prior sentences, each passage text capped at `word_cap` words.
pub fn render(
    question: &str,
    passages: &[PromptPassage],
    reasoning: &[String],
    word_cap: usize,
) -> String {
    let caps = vec![word_cap; passages.len()];
    render_parts(question, passages, &caps, reasoning, None)
}

/// [`render`], then ` {suffix}` after the reasoning (the forced `So the answer is:`).
pub fn render_with_suffix(
    question: &str,
    passages: &[PromptPassage],
    reasoning: &[String],
    word_cap: usize,
    suffix: Option<&str>,
) -> String {
    let caps = vec![word_cap; passages.len()];
    render_parts(question, passages, &caps, reasoning, suffix)
}

/// The continuation a model is trained to produce after a rendered prompt: `" " + target`
/// (followed by EOS, which the trainer appends as a token).
pub fn target_continuation(target: &str) -> String {
    format!(" {}", target.trim())
}

/// Renders the plain layout with a word cap per passage (`caps[i]` for `passages[i]`).
fn render_parts(
    question: &str,
    passages: &[PromptPassage],
    caps: &[usize],
    reasoning: &[String],
    suffix: Option<&str>,
) -> String {
    let mut s = String::new();
    push_passages(&mut s, passages, caps);
    s.push_str("Q: ");
    s.push_str(question.trim());
    s.push_str("\nA:");
    push_reasoning(&mut s, reasoning, suffix);
    s
}

fn push_passages(s: &mut String, passages: &[PromptPassage], caps: &[usize]) {
    for (p, &cap) in passages.iter().zip(caps) {
        s.push_str("Wikipedia Title: ");
        s.push_str(p.title.trim());
        s.push('\n');
        s.push_str(&cap_words(&p.text, cap));
        s.push_str("\n\n");
    }
}

fn push_reasoning(s: &mut String, reasoning: &[String], suffix: Option<&str>) {
    for r in reasoning {
        s.push(' ');
        s.push_str(r.trim());
    }
    if let Some(suffix) = suffix {
        s.push(' ');
        s.push_str(suffix.trim());
    }
}

/// A prompt rendered to fit a token budget.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedPrompt {
    /// The prompt text.
    pub text: String,
    /// Its length in tokens (by the counter given to [`fit`]).
    pub tokens: usize,
    /// Words cut from passage tails beyond the word cap to make it fit.
    pub words_dropped: usize,
    /// Oldest passages removed entirely (after all passage text was gone).
    pub passages_dropped: usize,
}

impl FittedPrompt {
    /// Whether anything was cut to fit.
    pub fn truncated(&self) -> bool {
        self.words_dropped > 0 || self.passages_dropped > 0
    }
}

/// Renders the prompt so that it is at most `budget` tokens by `count_tokens`: first the tail
/// words of the oldest passages are dropped (oldest passage first), then, if the passage texts
/// are all gone, the oldest passages themselves. The question, the reasoning and the suffix are
/// never cut; if they alone exceed the budget the result is [`Error::ContextOverflow`].
pub fn fit(
    question: &str,
    passages: &[PromptPassage],
    reasoning: &[String],
    suffix: Option<&str>,
    word_cap: usize,
    budget: usize,
    count_tokens: impl FnMut(&str) -> Result<usize>,
) -> Result<FittedPrompt> {
    fit_parts(
        &PromptLayout::Plain,
        Framework::Ircot,
        question,
        passages,
        reasoning,
        suffix,
        word_cap,
        budget,
        count_tokens,
    )
}

#[allow(clippy::too_many_arguments)]
fn fit_parts(
    layout: &PromptLayout,
    framework: Framework,
    question: &str,
    passages: &[PromptPassage],
    reasoning: &[String],
    suffix: Option<&str>,
    word_cap: usize,
    budget: usize,
    mut count_tokens: impl FnMut(&str) -> Result<usize>,
) -> Result<FittedPrompt> {
    let mut caps: Vec<usize> = passages
        .iter()
        .map(|p| p.text.split_whitespace().count().min(word_cap))
        .collect();
    let mut first = 0; // passages before `first` are dropped
    let mut words_dropped = 0;
    loop {
        let text = layout.render_parts(
            framework,
            question,
            &passages[first..],
            &caps[first..],
            reasoning,
            suffix,
        )?;
        let tokens = count_tokens(&text)?;
        if tokens <= budget {
            return Ok(FittedPrompt {
                text,
                tokens,
                words_dropped,
                passages_dropped: first,
            });
        }
        let over = tokens - budget;
        if let Some(i) = (first..passages.len()).find(|&i| caps[i] > 0) {
            // A word is at least one token almost always, so dropping `over` words rarely
            // overshoots by much; the loop re-measures either way.
            let cut = over.min(caps[i]).max(1);
            caps[i] -= cut;
            words_dropped += cut;
        } else if first < passages.len() {
            first += 1;
        } else {
            return Err(Error::ContextOverflow { tokens, budget });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(title: &str, text: &str) -> PromptPassage {
        PromptPassage {
            title: title.into(),
            text: text.into(),
        }
    }

    fn words(s: &str) -> Result<usize> {
        Ok(s.split_whitespace().count())
    }

    #[test]
    fn renders_the_ircot_layout() {
        let ps = [p("A", "one two  three"), p("B", "four")];
        let r = vec!["First.".to_string(), "Second.".to_string()];
        assert_eq!(
            render("Who?", &ps, &r, 2),
            "Wikipedia Title: A\none two\n\nWikipedia Title: B\nfour\n\nQ: Who?\nA: First. Second."
        );
        assert_eq!(render("Who?", &[], &[], 2), "Q: Who?\nA:");
        assert_eq!(
            render_with_suffix("Who?", &ps[..1], &r[..1], 9, Some("So the answer is:")),
            "Wikipedia Title: A\none two three\n\nQ: Who?\nA: First. So the answer is:"
        );
        assert_eq!(
            target_continuation("So the answer is: x."),
            " So the answer is: x."
        );
    }

    #[test]
    fn appending_passages_and_sentences_keeps_the_prefix() {
        let ps = [p("A", "a b c"), p("B", "d e"), p("C", "f")];
        let r = vec!["R1.".to_string(), "R2.".to_string()];
        let step1 = render("Q?", &ps[..1], &[], 100);
        let step2 = render("Q?", &ps[..2], &r[..1], 100);
        let step3 = render("Q?", &ps, &r, 100);
        let passage_prefix = |s: &str| s[..s.find("Q: ").unwrap_or(0)].to_string();
        assert!(step2.starts_with(&passage_prefix(&step1)));
        assert!(step3.starts_with(&passage_prefix(&step2)));
        // Same passages, one more sentence: the whole earlier prompt is a prefix.
        assert!(render("Q?", &ps, &r, 100).starts_with(&render("Q?", &ps, &r[..1], 100)));
    }

    #[test]
    fn fit_cuts_the_oldest_passage_tail_first() -> Result<()> {
        let ps = [p("A", "a1 a2 a3 a4"), p("B", "b1 b2 b3")];
        let r = vec!["r1 r2.".to_string()];
        let full = render("q q", &ps, &r, 100);
        let n = words(&full)?;
        let f = fit("q q", &ps, &r, None, 100, n, words)?;
        assert!(!f.truncated());
        assert_eq!(f.text, full);
        let f = fit("q q", &ps, &r, None, 100, n - 3, words)?;
        assert_eq!(f.words_dropped, 3);
        assert!(f.text.contains("Title: A\na1\n\n"), "{}", f.text);
        assert!(f.text.contains("b1 b2 b3"));
        assert!(f.text.ends_with("Q: q q\nA: r1 r2."));
        // Past all of A's words, B's tail goes next.
        let f = fit("q q", &ps, &r, None, 100, n - 5, words)?;
        assert!(f.text.contains("Title: A\n\n\n"), "{}", f.text);
        assert!(f.text.contains("Title: B\nb1 b2\n\n"), "{}", f.text);
        Ok(())
    }

    #[test]
    fn fit_drops_whole_passages_then_fails_on_a_too_long_question() -> Result<()> {
        let ps = [p("A B C", "a"), p("D", "d")];
        // Question + "Q: A:" alone is 7 words.
        let q = "w1 w2 w3 w4 w5";
        let f = fit(q, &ps, &[], None, 100, 10, words)?;
        assert_eq!(f.passages_dropped, 1);
        assert_eq!(f.text, format!("Wikipedia Title: D\n\n\nQ: {q}\nA:"));
        match fit(q, &ps, &[], Some("So the answer is:"), 100, 6, words) {
            Err(Error::ContextOverflow { tokens, budget }) => {
                assert_eq!((tokens, budget), (11, 6));
            }
            other => panic!("expected ContextOverflow, got {other:?}"),
        }
        Ok(())
    }
}
