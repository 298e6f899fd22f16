//! The loop's settings.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::LoopDefaults;
use crate::prompt::Framework;

/// Settings of the loop. Defaults are docs/DESIGN.md's (and [`LoopDefaults`]'s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LoopOptions {
    /// Passages retrieved per step.
    pub top_k: usize,
    /// Cap on passages held in total.
    pub max_passages: usize,
    /// Steps before forced aggregation (the last step is the forced one).
    pub max_steps: usize,
    /// Words kept per passage text.
    pub passage_word_cap: usize,
    /// Phrase appended to force the answer.
    pub stop_phrase: String,
    /// Maximum new tokens per sentence.
    pub max_sentence_tokens: usize,
    /// How the loop reasons step by step (IRCoT by default; settings written before the
    /// choice existed load as IRCoT). IRCoT's forced aggregation uses `stop_phrase`, Self-Ask's
    /// its own `So the final answer is:`.
    #[serde(default, skip_serializing_if = "Framework::is_ircot")]
    pub framework: Framework,
    /// How step prompts are laid out (plain, or the model's chat template). Not serialized: the
    /// model's `steper.json` records the format and the template comes from its directory.
    #[serde(skip)]
    pub prompt: crate::prompt::PromptLayout,
}

impl LoopOptions {
    /// Sets the framework.
    #[must_use]
    pub fn with_framework(mut self, framework: Framework) -> Self {
        self.framework = framework;
        self
    }

    /// Sets the prompt layout.
    #[must_use]
    pub fn with_prompt_layout(mut self, prompt: crate::prompt::PromptLayout) -> Self {
        self.prompt = prompt;
        self
    }

    /// Sets `top_k`.
    #[must_use]
    pub fn with_top_k(mut self, top_k: usize) -> Self {
        self.top_k = top_k;
        self
    }

    /// Sets `max_passages`.
    #[must_use]
    pub fn with_max_passages(mut self, max_passages: usize) -> Self {
        self.max_passages = max_passages;
        self
    }

    /// Sets `max_steps`.
    #[must_use]
    pub fn with_max_steps(mut self, max_steps: usize) -> Self {
        self.max_steps = max_steps;
        self
    }

    /// Sets `passage_word_cap`.
    #[must_use]
    pub fn with_passage_word_cap(mut self, passage_word_cap: usize) -> Self {
        self.passage_word_cap = passage_word_cap;
        self
    }

    /// Sets `stop_phrase`.
    #[must_use]
    pub fn with_stop_phrase(mut self, stop_phrase: impl Into<String>) -> Self {
        self.stop_phrase = stop_phrase.into();
        self
    }

    /// Sets `max_sentence_tokens`.
    #[must_use]
    pub fn with_max_sentence_tokens(mut self, max_sentence_tokens: usize) -> Self {
        self.max_sentence_tokens = max_sentence_tokens;
        self
    }
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions::from(&LoopDefaults::default())
    }
}

impl From<&LoopDefaults> for LoopOptions {
    fn from(d: &LoopDefaults) -> Self {
        LoopOptions {
            top_k: d.top_k,
            max_passages: d.max_passages,
            max_steps: d.max_steps,
            passage_word_cap: d.passage_word_cap,
            stop_phrase: d.stop_phrase.clone(),
            max_sentence_tokens: d.max_sentence_tokens,
            framework: d.framework,
            prompt: crate::prompt::PromptLayout::Plain,
        }
    }
}

impl LoopOptions {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.max_steps == 0 {
            return Err(Error::InvalidOption {
                option: "max_steps".into(),
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        if self.max_sentence_tokens == 0 {
            return Err(Error::InvalidOption {
                option: "max_sentence_tokens".into(),
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_written_before_the_framework_choice_load_as_ircot() -> Result<()> {
        let old = serde_json::json!({
            "top_k": 4, "max_passages": 15, "max_steps": 5, "passage_word_cap": 100,
            "stop_phrase": "So the answer is:", "max_sentence_tokens": 48
        });
        let opts: LoopOptions =
            serde_json::from_value(old.clone()).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(opts.framework, Framework::Ircot);
        // IRCoT options serialize as before; Self-Ask's name their framework.
        let back = serde_json::to_value(&opts).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(back, old);
        let sa = serde_json::to_value(opts.with_framework(Framework::SelfAsk))
            .map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(sa["framework"], "self-ask");
        let read: LoopOptions =
            serde_json::from_value(sa).map_err(|e| Error::Internal(e.to_string()))?;
        assert_eq!(read.framework, Framework::SelfAsk);
        assert_eq!("self-ask".parse::<Framework>()?, Framework::SelfAsk);
        assert_eq!("ircot".parse::<Framework>()?, Framework::Ircot);
        assert!(matches!(
            "selfask".parse::<Framework>(),
            Err(Error::InvalidOption { .. })
        ));
        Ok(())
    }
}
