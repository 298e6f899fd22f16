//! The Self-Ask layout (question decomposition), passages first as in IRCoT's so that a step
//! only appends:
//!
//! ```text
//! Wikipedia Title: {title}
//! {text, capped at N words}
//!
//! Question: {question}
//! Are follow up questions needed here: Yes.
//! Follow up: {q_1}
//! Intermediate answer: {a_1}
//! {suffix}
//! ```
//!
//! Every prior step (`Follow up: q` + newline + `Intermediate answer: a`) is followed by a
//! newline; the suffix, when there is one, ends the prompt without one. The loop's suffixes are
//! none (the model writes the next `Follow up:` or `So the final answer is:` line), the pending
//! `Follow up: q` + newline + `Intermediate answer:` (the model answers the sub-question from the
//! passages retrieved for it) and `So the final answer is:` (forced aggregation). The
//! continuation of a step is its target as is, without the leading space of IRCoT's.
//!
//! The chat layout puts the passages and `Question: {question}` in the user message and starts
//! the assistant turn with `Are follow up questions needed here: Yes.` and the steps so far.

use crate::data::PromptPassage;
use crate::error::Result;

use super::chat::{ChatMessage, ChatTemplate};
use super::push_passages;

/// The line a sub-question starts with.
pub(crate) const FOLLOW_UP: &str = "Follow up:";
/// The line the answer to a sub-question starts with.
pub(crate) const INTERMEDIATE_ANSWER: &str = "Intermediate answer:";
/// The phrase the final answer follows (also the forced suffix).
pub(crate) const FINAL_ANSWER: &str = "So the final answer is:";
/// The line after the question.
const FOLLOW_UPS_NEEDED: &str = "Are follow up questions needed here: Yes.";

/// The plain layout with a word cap per passage.
pub(super) fn render_plain(
    question: &str,
    passages: &[PromptPassage],
    caps: &[usize],
    steps: &[String],
    suffix: Option<&str>,
) -> String {
    let mut s = String::new();
    push_passages(&mut s, passages, caps);
    s.push_str("Question: ");
    s.push_str(question.trim());
    s.push('\n');
    push_steps(&mut s, steps, suffix);
    s
}

/// The chat layout: passages and question as the user message, the steps as the start of the
/// assistant turn.
pub(super) fn render_chat(
    template: &ChatTemplate,
    question: &str,
    passages: &[PromptPassage],
    caps: &[usize],
    steps: &[String],
    suffix: Option<&str>,
) -> Result<String> {
    let mut user = String::new();
    push_passages(&mut user, passages, caps);
    user.push_str("Question: ");
    user.push_str(question.trim());
    let mut s = template.render(&[ChatMessage::new("user", user)], true)?;
    push_steps(&mut s, steps, suffix);
    Ok(s)
}

fn push_steps(s: &mut String, steps: &[String], suffix: Option<&str>) {
    s.push_str(FOLLOW_UPS_NEEDED);
    s.push('\n');
    for r in steps {
        s.push_str(r.trim());
        s.push('\n');
    }
    if let Some(suffix) = suffix {
        s.push_str(suffix.trim());
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Framework, PromptLayout};
    use super::*;

    fn p(title: &str, text: &str) -> PromptPassage {
        PromptPassage {
            title: title.into(),
            text: text.into(),
        }
    }

    #[test]
    fn renders_the_self_ask_layout() -> Result<()> {
        let ps = [p("A", "one two  three"), p("B", "four")];
        let hops = vec!["Follow up: Who is A?\nIntermediate answer: One.".to_string()];
        let layout = PromptLayout::Plain;
        let fw = Framework::SelfAsk;
        assert_eq!(
            layout.render_for(fw, "Who?", &ps, &hops, 2, None)?,
            "Wikipedia Title: A\none two\n\nWikipedia Title: B\nfour\n\nQuestion: Who?\n\
             Are follow up questions needed here: Yes.\n\
             Follow up: Who is A?\nIntermediate answer: One.\n"
        );
        assert_eq!(
            layout.render_for(fw, "Who?", &[], &[], 2, Some(FINAL_ANSWER))?,
            "Question: Who?\nAre follow up questions needed here: Yes.\nSo the final answer is:"
        );
        // The answer round extends the asking round's prompt when no passage came in between.
        let ask = layout.render_for(fw, "Who?", &ps, &hops, 9, None)?;
        let answer = layout.render_for(
            fw,
            "Who?",
            &ps,
            &hops,
            9,
            Some("Follow up: Who is B?\nIntermediate answer:"),
        )?;
        assert!(answer.starts_with(&ask));
        assert_eq!(
            Framework::SelfAsk.continuation(" Follow up: x?\nIntermediate answer: y."),
            "Follow up: x?\nIntermediate answer: y."
        );
        assert_eq!(
            Framework::Ircot.continuation("So the answer is: x."),
            " So the answer is: x."
        );
        // IRCoT through the framework entry point is the IRCoT layout.
        assert_eq!(
            layout.render_for(Framework::Ircot, "Who?", &ps, &hops[..0], 2, None)?,
            super::super::render("Who?", &ps, &[], 2)
        );
        Ok(())
    }

    #[test]
    fn fitting_cuts_passages_never_the_steps() -> Result<()> {
        let words = |s: &str| -> Result<usize> { Ok(s.split_whitespace().count()) };
        let ps = [p("A", "a1 a2 a3 a4"), p("B", "b1 b2 b3")];
        let hops = vec!["Follow up: q1?\nIntermediate answer: x.".to_string()];
        let fw = Framework::SelfAsk;
        let full = PromptLayout::Plain.render_for(fw, "q q", &ps, &hops, 100, None)?;
        let n = words(&full)?;
        let f = PromptLayout::Plain.fit_for(fw, "q q", &ps, &hops, None, 100, n - 3, words)?;
        assert_eq!(f.words_dropped, 3);
        assert!(f.text.contains("Title: A\na1\n\n"), "{}", f.text);
        assert!(f
            .text
            .ends_with("Follow up: q1?\nIntermediate answer: x.\n"));
        Ok(())
    }
}
