//! IRCoT (reasoning path): one sentence per step; the sentence, IRCoT-cleaned, is the next
//! query; `answer is:? (.*)` ends the run; the forced step's prompt ends with the stop phrase.

use super::{FrameworkSteps, Outcome, Round};
use crate::answer::{clean_query, extract_answer, first_sentence};

/// IRCoT's state for one question: the next query and the sentences so far.
pub(crate) struct Ircot {
    stop_phrase: String,
    query: String,
    reasoning: Vec<String>,
}

impl Ircot {
    /// The first query is the question.
    pub(crate) fn new(question: &str, stop_phrase: &str) -> Self {
        Ircot {
            stop_phrase: stop_phrase.to_string(),
            query: question.trim().to_string(),
            reasoning: Vec::new(),
        }
    }
}

impl FrameworkSteps for Ircot {
    fn plan(&self, _question: &str, last_step: bool, _held: usize) -> Round {
        Round {
            query: Some(self.query.clone()),
            forced: last_step,
        }
    }

    fn reasoning(&self) -> &[String] {
        &self.reasoning
    }

    fn suffix(&self, round: &Round) -> Option<String> {
        round.forced.then(|| self.stop_phrase.clone())
    }

    fn read(&mut self, question: &str, round: &Round, text: &str) -> Outcome {
        let forced = round.forced;
        // One sentence; the answer if it has one.
        let generated = first_sentence(text);
        let sentence = if forced {
            format!("{} {}", self.stop_phrase.trim(), generated)
                .trim()
                .to_string()
        } else {
            generated.to_string()
        };
        let answer = extract_answer(&sentence)
            .or_else(|| forced.then(|| generated.trim_end_matches('.').trim().to_string()));
        if let Some(answer) = answer {
            return Outcome::Answer { sentence, answer };
        }
        // Next query.
        let cleaned = clean_query(&sentence);
        self.query = if cleaned.trim().is_empty() {
            question.trim().to_string()
        } else {
            cleaned
        };
        self.reasoning.push(sentence.clone());
        Outcome::Step(sentence)
    }
}
