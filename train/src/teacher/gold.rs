//! The annotation-derived teacher (see the module docs of [`crate::teacher`]).

use std::collections::HashSet;

use steper_runtime::data::QaExample;
use steper_runtime::reasoning::{StepModel, StepOutput, StepRequest};

/// Words ignored when scoring sentence relevance.
const STOP: &[&str] = &[
    "a", "an", "the", "of", "in", "on", "at", "to", "is", "was", "are", "were", "and", "or", "for",
    "by", "which", "what", "who", "whom", "where", "when", "how", "that", "this", "it", "its",
    "as", "with", "from", "did", "does", "do", "be", "been", "has", "have", "had",
];

fn content_words(s: &str) -> HashSet<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .filter(|w| !STOP.contains(&w.as_str()))
        .collect()
}

/// Splits text into sentences (after `.`, `!` or `?` followed by whitespace).
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        cur.push(c);
        let end = matches!(c, '.' | '!' | '?')
            && chars.get(i + 1).map(|n| n.is_whitespace()).unwrap_or(true);
        if end {
            let s = cur.trim().to_string();
            if !s.is_empty() {
                out.push(s);
            }
            cur.clear();
        }
    }
    let s = cur.trim().to_string();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

/// The annotation-derived teacher.
pub struct GoldTeacher {
    example: Option<QaExample>,
    gold: Vec<String>,
    used: Vec<String>,
    budget: Option<usize>,
    tokenizer: Option<tokenizers::Tokenizer>,
}

impl GoldTeacher {
    /// A teacher with no token budget (prompts are never cut).
    pub fn new() -> Self {
        GoldTeacher {
            example: None,
            gold: Vec::new(),
            used: Vec::new(),
            budget: None,
            tokenizer: None,
        }
    }

    /// Fits prompts into `budget` tokens of `tokenizer` (the student's), so that the records it
    /// yields fit the student's context.
    pub fn with_budget(mut self, tokenizer: tokenizers::Tokenizer, budget: usize) -> Self {
        self.tokenizer = Some(tokenizer);
        self.budget = Some(budget);
        self
    }

    /// Sets the question the next loop run is about (its answers and supporting titles).
    pub fn set_example(&mut self, ex: &QaExample) {
        self.gold = ex.gold_titles();
        self.example = Some(ex.clone());
        self.used.clear();
    }

    fn answer(&self) -> String {
        self.example
            .as_ref()
            .and_then(|e| e.answers.first().cloned())
            .unwrap_or_default()
    }

    fn best_sentence(&self, question: &str, text: &str) -> String {
        let q = content_words(question);
        let answers: Vec<String> = self
            .example
            .as_ref()
            .map(|e| e.answers.clone())
            .unwrap_or_default();
        let mut best = (f64::MIN, String::new());
        for s in sentences(text) {
            let w = content_words(&s);
            let mut score = w.intersection(&q).count() as f64;
            // Bridge entities: a sentence naming another supporting paragraph leads to the next hop.
            for t in &self.gold {
                if !self.used.contains(t) && s.contains(t.as_str()) {
                    score += 2.0;
                }
            }
            if answers
                .iter()
                .any(|a| !a.is_empty() && s.contains(a.as_str()))
            {
                score += 3.0;
            }
            if score > best.0 {
                best = (score, s);
            }
        }
        best.1
    }
}

impl Default for GoldTeacher {
    fn default() -> Self {
        Self::new()
    }
}

impl StepModel for GoldTeacher {
    fn name(&self) -> &str {
        "gold"
    }

    fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize> {
        self.budget.map(|b| b.saturating_sub(max_new_tokens))
    }

    fn count_tokens(&self, text: &str) -> steper_runtime::Result<usize> {
        match &self.tokenizer {
            Some(t) => Ok(t
                .encode(text, false)
                .map_err(|e| steper_runtime::Error::Tokenizer(e.to_string()))?
                .len()),
            None => Ok(text.split_whitespace().count()),
        }
    }

    fn begin_question(&mut self, _question: &str) -> steper_runtime::Result<()> {
        self.used.clear();
        Ok(())
    }

    fn generate(&mut self, req: &StepRequest<'_>) -> steper_runtime::Result<StepOutput> {
        let complete = !self.gold.is_empty() && self.gold.iter().all(|t| self.used.contains(t));
        let text = if req.forced {
            if complete {
                format!("{}.", self.answer())
            } else {
                "unknown.".to_string()
            }
        } else if complete {
            format!("So the answer is: {}.", self.answer())
        } else {
            let next = req
                .passages
                .iter()
                .find(|p| self.gold.contains(&p.title) && !self.used.contains(&p.title));
            match next {
                Some(p) => {
                    let s = self.best_sentence(req.question, &p.text);
                    self.used.push(p.title.clone());
                    if self.gold.iter().all(|t| self.used.contains(t)) && s.is_empty() {
                        format!("So the answer is: {}.", self.answer())
                    } else {
                        s
                    }
                }
                None => {
                    // No new evidence: restate the most relevant sentence of the newest passage
                    // (it becomes the next query).
                    let p = req.passages.last();
                    p.map(|p| self.best_sentence(req.question, &p.text))
                        .unwrap_or_default()
                }
            }
        };
        let n = text.split_whitespace().count();
        Ok(StepOutput {
            text,
            new_tokens: n,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sentences() {
        assert_eq!(
            sentences("A b. C d! E f? G"),
            vec!["A b.", "C d!", "E f?", "G"]
        );
        assert_eq!(sentences("Mr. Smith went. No.").len(), 3);
    }
}
