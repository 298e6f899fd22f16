//! The prompt budget of the annotation-derived teachers: prompts fitted into a number of tokens
//! of the student's tokenizer, so that the records they yield fit the student's context.

/// A token budget and the tokenizer that counts it; without one, prompts are never cut and
/// tokens are counted as whitespace-separated words.
#[derive(Default)]
pub(crate) struct PromptBudget {
    budget: Option<usize>,
    tokenizer: Option<tokenizers::Tokenizer>,
}

impl PromptBudget {
    /// Prompts of at most `budget` tokens of `tokenizer` (the generation included).
    pub(crate) fn new(tokenizer: tokenizers::Tokenizer, budget: usize) -> Self {
        PromptBudget {
            budget: Some(budget),
            tokenizer: Some(tokenizer),
        }
    }

    /// The tokens a prompt may take when `max_new_tokens` are generated after it; `None`
    /// without a budget.
    pub(crate) fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize> {
        self.budget.map(|b| b.saturating_sub(max_new_tokens))
    }

    /// The tokens of `text`: the tokenizer's count (its failure a
    /// [`steper_runtime::Error::Tokenizer`]), or the whitespace-separated words without one.
    pub(crate) fn count_tokens(&self, text: &str) -> steper_runtime::Result<usize> {
        match &self.tokenizer {
            Some(t) => Ok(t
                .encode(text, false)
                .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))?
                .len()),
            None => Ok(text.split_whitespace().count()),
        }
    }
}

/// The [`steper_runtime::StepModel`] methods `prompt_budget` and `count_tokens` of a teacher
/// whose field `budget` is a [`PromptBudget`].
macro_rules! prompt_budget_methods {
    () => {
        fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize> {
            self.budget.prompt_budget(max_new_tokens)
        }

        fn count_tokens(&self, text: &str) -> steper_runtime::Result<usize> {
            self.budget.count_tokens(text)
        }
    };
}
pub(crate) use prompt_budget_methods;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_tokenizer_nothing_is_cut_and_words_are_counted() -> steper_runtime::Result<()> {
        let b = PromptBudget::default();
        assert_eq!(b.prompt_budget(16), None);
        assert_eq!(b.count_tokens("  two\twords \n")?, 2);
        Ok(())
    }

    /// A word-level tokenizer that splits punctuation off words (`it?` is two tokens).
    const TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "it": 1}, "unk_token": "[UNK]"}}"#;

    #[test]
    fn a_budget_leaves_room_for_the_generation_and_counts_with_the_tokenizer(
    ) -> steper_runtime::Result<()> {
        let tok: tokenizers::Tokenizer = TOKENIZER
            .parse()
            .map_err(|e| steper_runtime::Error::Tokenizer(format!("{e}")))?;
        let b = PromptBudget::new(tok, 100);
        assert_eq!(b.prompt_budget(16), Some(84));
        assert_eq!(b.prompt_budget(200), Some(0));
        assert_eq!(b.count_tokens("Who wrote it?")?, 4);
        Ok(())
    }
}
