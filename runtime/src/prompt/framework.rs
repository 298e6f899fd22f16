//! The loop's framework choice.

use serde::{Deserialize, Serialize};

use super::target_continuation;
use crate::error::{Error, Result};

/// How the loop reasons, step by step: the prompt layout, the retrieval query, how a step's
/// output is read and when the loop stops (`--framework ircot|self-ask`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framework {
    /// Reasoning path (IRCoT): each step states one sentence, which is the next query; `So the
    /// answer is:` ends the run.
    #[default]
    Ircot,
    /// Question decomposition (Self-Ask): each step asks `Follow up:` a sub-question, retrieves
    /// for it and answers it (`Intermediate answer:`); `So the final answer is:` ends the run.
    SelfAsk,
}

impl Framework {
    /// The name on the command line and in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Framework::Ircot => "ircot",
            Framework::SelfAsk => "self-ask",
        }
    }

    /// Whether this is [`Framework::Ircot`] (configuration files leave the default out).
    pub fn is_ircot(&self) -> bool {
        *self == Framework::Ircot
    }

    /// The continuation a model is trained to produce after a step prompt of this framework:
    /// IRCoT's [`target_continuation`] (`" " + target`), Self-Ask's target as is (its prompts
    /// end with a newline).
    pub fn continuation(self, target: &str) -> String {
        match self {
            Framework::Ircot => target_continuation(target),
            Framework::SelfAsk => target.trim().to_string(),
        }
    }
}

impl std::fmt::Display for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Framework {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ircot" => Ok(Framework::Ircot),
            "self-ask" => Ok(Framework::SelfAsk),
            other => Err(Error::InvalidOption {
                option: "framework".into(),
                expected: "ircot or self-ask".into(),
                got: other.into(),
            }),
        }
    }
}
