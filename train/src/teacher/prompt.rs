//! The teacher prompt: an instruction header and few-shot demonstrations prepended to the
//! student's plain prompt for instruction-tuned teachers. The step-wise records keep the plain
//! template; only the teacher call sees the header.
//!
//! File format (see `train/prompts/ircot-fewshot.txt`, the default):
//!
//! ```text
//! # comment
//! [instruction]
//! Answer the question ... write: So the answer is: <answer>.
//!
//! [demonstration]
//! Wikipedia Title: ...
//! ...
//!
//! Q: ...
//! A: first sentence. second sentence. So the answer is: X.
//! ```
//!
//! Lines starting with `#` are comments. There is exactly one `[instruction]` section and any
//! number of `[demonstration]` sections, all of one framework, told from their text:
//!
//! - IRCoT ([`Framework::Ircot`]): a `Q:` line and an `A:` line that ends with an answer
//!   sentence (`answer is: …`);
//! - Self-Ask ([`Framework::SelfAsk`], e.g. `data/self_ask_prompts/demonstrations.txt`): a
//!   `Question:` line, then `Follow up:` lines each followed by an `Intermediate answer:` line,
//!   and last `So the final answer is: …` (the student's Self-Ask layout).
//!
//! A prompt is used only with the framework of its demonstrations ([`TeacherPrompt::check`]).

use std::path::Path;

use steper_runtime::Framework;

use crate::error::{Error, Result};

/// Self-Ask's line labels, as the student's layout writes them.
const SA_QUESTION: &str = "Question: ";
const SA_FOLLOW_UP: &str = "Follow up:";
const SA_INTERMEDIATE: &str = "Intermediate answer:";
const SA_FINAL: &str = "So the final answer is:";

/// The default prompt file shipped with the crate.
pub const DEFAULT_FEWSHOT: &str = include_str!("../../prompts/ircot-fewshot.txt");

/// An instruction header and few-shot demonstrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeacherPrompt {
    /// The instruction header (the system message in chat mode).
    pub instruction: String,
    /// Worked examples in the student's template.
    pub demonstrations: Vec<String>,
    /// The framework of the demonstrations (`None` without any: the header alone fits either).
    pub framework: Option<Framework>,
}

/// A chat message (`role` is `system` or `user`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    /// `system` or `user`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

enum Section {
    None,
    Instruction,
    Demonstration,
}

impl TeacherPrompt {
    /// The shipped default (`train/prompts/ircot-fewshot.txt`).
    pub fn default_fewshot() -> Result<Self> {
        Self::parse(DEFAULT_FEWSHOT, "train/prompts/ircot-fewshot.txt")
    }

    /// Reads a prompt file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a prompt file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut instruction: Option<(usize, Vec<&str>)> = None;
        let mut demos: Vec<(usize, Vec<&str>)> = Vec::new();
        let mut section = Section::None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.starts_with('#') {
                continue;
            }
            match line.trim() {
                "[instruction]" => {
                    if instruction.is_some() {
                        return Err(Error::Input(format!(
                            "{origin}:{n}: a second [instruction] section (expected exactly one)"
                        )));
                    }
                    instruction = Some((n, Vec::new()));
                    section = Section::Instruction;
                    continue;
                }
                "[demonstration]" => {
                    demos.push((n, Vec::new()));
                    section = Section::Demonstration;
                    continue;
                }
                _ => {}
            }
            match section {
                Section::None if line.trim().is_empty() => {}
                Section::None => {
                    return Err(Error::Input(format!(
                        "{origin}:{n}: text before the first section (expected a line \
                         `[instruction]` or `[demonstration]`)"
                    )))
                }
                Section::Instruction => {
                    if let Some((_, lines)) = instruction.as_mut() {
                        lines.push(line);
                    }
                }
                Section::Demonstration => {
                    if let Some((_, lines)) = demos.last_mut() {
                        lines.push(line);
                    }
                }
            }
        }
        let (inst_line, inst) = instruction.ok_or_else(|| {
            Error::Input(format!(
                "{origin}: no [instruction] section (expected exactly one)"
            ))
        })?;
        let instruction = inst.join("\n").trim().to_string();
        if instruction.is_empty() {
            return Err(Error::Input(format!(
                "{origin}:{inst_line}: the [instruction] section is empty"
            )));
        }
        let mut demonstrations = Vec::with_capacity(demos.len());
        let mut framework: Option<(usize, Framework)> = None;
        for (n, lines) in demos {
            let d = lines.join("\n").trim().to_string();
            let fw = demonstration_framework(&d)
                .map_err(|why| Error::Input(format!("{origin}:{n}: {why}")))?;
            match framework {
                Some((first, f)) if f != fw => {
                    return Err(Error::Input(format!(
                        "{origin}:{n}: a {fw} demonstration after the {f} one at line {first} \
                         (a prompt file holds demonstrations of one framework)"
                    )))
                }
                None => framework = Some((n, fw)),
                _ => {}
            }
            demonstrations.push(d);
        }
        Ok(TeacherPrompt {
            instruction,
            demonstrations,
            framework: framework.map(|(_, f)| f),
        })
    }

    /// Checks that the demonstrations are of `framework` (the loop's `--framework`): IRCoT
    /// demonstrations would teach the teacher to write sentences where Self-Ask parses
    /// follow-ups, and the other way round.
    pub fn check(&self, framework: Framework) -> Result<()> {
        match self.framework {
            Some(f) if f != framework => Err(Error::Input(format!(
                "the demonstrations are {f} ones and the loop runs {framework}: use {framework} \
                 demonstrations{} or --teacher-prompt none",
                match framework {
                    Framework::SelfAsk => " (e.g. data/self_ask_prompts/demonstrations.txt)",
                    Framework::Ircot => " (e.g. default or ircot:data/ircot_prompts/musique.txt)",
                }
            ))),
            _ => Ok(()),
        }
    }

    /// IRCoT's hand-written CoT demonstrations (`ircot_prompts/<dataset>.txt`, parsed by
    /// [`steper_runtime::fewshot::load_ircot`]), the first `n` of them (all when `None`), under
    /// the shipped default instruction header.
    pub fn load_ircot(path: &Path, n: Option<usize>) -> Result<Self> {
        Ok(TeacherPrompt {
            instruction: Self::default_fewshot()?.instruction,
            demonstrations: steper_runtime::fewshot::load_ircot(path, n)?,
            framework: Some(Framework::Ircot),
        })
    }

    /// Parses a `--teacher-prompt` value: `none`, `default` (the shipped file), `ircot:PATH` or
    /// `ircot:PATH:N` (IRCoT demonstrations, the first N), or a prompt-file path.
    pub fn from_spec(spec: &str) -> Result<Option<Self>> {
        match spec {
            "none" => Ok(None),
            "default" => Ok(Some(Self::default_fewshot()?)),
            s => match s.strip_prefix("ircot:") {
                Some(rest) => {
                    let (path, n) = steper_runtime::fewshot::parse_spec(rest);
                    Ok(Some(Self::load_ircot(&path, n)?))
                }
                None => Ok(Some(Self::load(Path::new(s))?)),
            },
        }
    }

    /// The text put before the student's prompt on `/v1/completions`: the header, then the
    /// demonstrations, each followed by a blank line.
    pub fn prefix(&self) -> String {
        let mut s = self.instruction.clone();
        s.push_str("\n\n");
        for d in &self.demonstrations {
            s.push_str(d);
            s.push_str("\n\n");
        }
        s
    }

    /// The full `/v1/completions` prompt for a student prompt.
    pub fn completion_prompt(&self, student_prompt: &str) -> String {
        let mut s = self.prefix();
        s.push_str(student_prompt);
        s
    }

    /// The `/v1/chat/completions` messages for a student prompt: the header as the system
    /// message; the demonstrations and the student's prompt as the user message.
    pub fn chat_messages(&self, student_prompt: &str) -> Vec<ChatMessage> {
        let mut user = String::new();
        for d in &self.demonstrations {
            user.push_str(d);
            user.push_str("\n\n");
        }
        user.push_str(student_prompt);
        vec![
            ChatMessage {
                role: "system",
                content: self.instruction.clone(),
            },
            ChatMessage {
                role: "user",
                content: user,
            },
        ]
    }
}

/// The framework of one demonstration, or why it is neither format.
fn demonstration_framework(d: &str) -> std::result::Result<Framework, String> {
    let lines: Vec<&str> = d.lines().map(str::trim_end).collect();
    if lines.iter().any(|l| l.starts_with(SA_QUESTION)) {
        return self_ask_demonstration(&lines).map(|()| Framework::SelfAsk);
    }
    if !lines.iter().any(|l| l.starts_with("Q: ")) {
        return Err(
            "demonstration has no `Q: ` line (IRCoT) or `Question: ` line (Self-Ask)".into(),
        );
    }
    match lines.iter().rev().find(|l| l.starts_with("A:")) {
        None => Err("demonstration has no `A:` line".into()),
        Some(a) if steper_runtime::answer::extract_answer(a.trim_start_matches("A:")).is_none() => {
            Err(
                "the demonstration's `A:` line does not end with an answer sentence (expected \
                 `... So the answer is: X.`)"
                    .into(),
            )
        }
        Some(_) => Ok(Framework::Ircot),
    }
}

/// Checks a Self-Ask demonstration's steps: after the `Question:` line, `Follow up:` /
/// `Intermediate answer:` pairs and last a non-empty `So the final answer is:` line.
fn self_ask_demonstration(lines: &[&str]) -> std::result::Result<(), String> {
    let at = lines
        .iter()
        .rposition(|l| l.starts_with(SA_QUESTION))
        .unwrap_or_default();
    let steps: Vec<&str> = lines[at + 1..]
        .iter()
        .copied()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("Are follow up questions needed"))
        .collect();
    let Some((last, hops)) = steps.split_last() else {
        return Err("Self-Ask demonstration has no steps after its `Question:` line".into());
    };
    match last.strip_prefix(SA_FINAL) {
        Some(answer) if !answer.trim().is_empty() => {}
        _ => {
            return Err(format!(
                "Self-Ask demonstration does not end with `{SA_FINAL} X` (its last line: {last:?})"
            ))
        }
    }
    if hops.is_empty() {
        return Err("Self-Ask demonstration has no `Follow up:` line".into());
    }
    for pair in hops.chunks(2) {
        let answered = pair.len() == 2
            && pair[0].starts_with(SA_FOLLOW_UP)
            && pair[1]
                .strip_prefix(SA_INTERMEDIATE)
                .is_some_and(|a| !a.trim().is_empty());
        if !answered {
            return Err(format!(
                "Self-Ask demonstration: expected a `{SA_FOLLOW_UP} q` line followed by \
                 `{SA_INTERMEDIATE} a`, found {pair:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_with_demonstrations() {
        let p = TeacherPrompt::default_fewshot().unwrap();
        assert!(p.instruction.contains("So the answer is"));
        assert_eq!(p.demonstrations.len(), 3);
        for d in &p.demonstrations {
            assert!(d.starts_with("Wikipedia Title: "), "{d}");
            assert!(!d.contains("[demonstration]"));
        }
        let full = p.completion_prompt("Wikipedia Title: X\nx\n\nQ: q?\nA:");
        assert!(full.starts_with(&p.instruction));
        assert!(full.ends_with("\n\nWikipedia Title: X\nx\n\nQ: q?\nA:"));
        let m = p.chat_messages("Q: q?\nA:");
        assert_eq!(m[0].role, "system");
        assert_eq!(m[0].content, p.instruction);
        assert!(m[1].content.ends_with("Q: q?\nA:"));
    }

    /// `--teacher-prompt ircot:PATH:N` takes the first N IRCoT demonstrations under the default
    /// instruction header.
    #[test]
    fn ircot_spec_takes_the_first_n_demonstrations() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/ircot_prompts/musique.txt");
        let two = TeacherPrompt::from_spec(&format!("ircot:{}:2", file.display()))
            .unwrap()
            .unwrap();
        assert_eq!(two.demonstrations.len(), 2);
        assert_eq!(
            two.instruction,
            TeacherPrompt::default_fewshot().unwrap().instruction
        );
        let all = TeacherPrompt::from_spec(&format!("ircot:{}", file.display()))
            .unwrap()
            .unwrap();
        assert_eq!(all.demonstrations.len(), 20);
        assert_eq!(all.demonstrations[..2], two.demonstrations[..]);
        assert!(TeacherPrompt::from_spec("none").unwrap().is_none());
        assert!(TeacherPrompt::from_spec("ircot:/nonexistent.txt").is_err());
    }

    #[test]
    fn errors_name_the_line() {
        let e = TeacherPrompt::parse("hello\n[instruction]\nx\n", "f.txt").unwrap_err();
        assert!(e.to_string().contains("f.txt:1"), "{e}");
        let e = TeacherPrompt::parse("[instruction]\nx\n\n[demonstration]\nQ: a\nA: b.\n", "f")
            .unwrap_err();
        assert!(e.to_string().contains("f:4") && e.to_string().contains("answer"));
        let e = TeacherPrompt::parse("[demonstration]\nQ: a\nA: So the answer is: b.\n", "f")
            .unwrap_err();
        assert!(e.to_string().contains("no [instruction]"), "{e}");
        let e = TeacherPrompt::parse("[instruction]\n\n", "f").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let ok = TeacherPrompt::parse("# c\n[instruction]\nDo it.\n", "f").unwrap();
        assert!(ok.demonstrations.is_empty());
        assert_eq!(ok.prefix(), "Do it.\n\n");
    }

    /// The framework is told from the demonstrations; Self-Ask ones must be the whole format,
    /// and a file holds one framework.
    #[test]
    fn self_ask_demonstrations_are_told_and_checked() {
        let head = "[instruction]\nAsk.\n\n[demonstration]\n";
        let ok =
            "Wikipedia Title: T\nt\n\nQuestion: q?\nAre follow up questions needed here: Yes.\n\
                  Follow up: a?\nIntermediate answer: b\nSo the final answer is: b\n";
        let p = TeacherPrompt::parse(&format!("{head}{ok}"), "f").unwrap();
        assert_eq!(p.framework, Some(Framework::SelfAsk));
        assert!(p.check(Framework::SelfAsk).is_ok());
        assert!(p.check(Framework::Ircot).is_err());
        assert_eq!(
            TeacherPrompt::default_fewshot().unwrap().framework,
            Some(Framework::Ircot)
        );
        assert_eq!(
            TeacherPrompt::parse("[instruction]\nx\n", "f")
                .unwrap()
                .framework,
            None
        );
        for (bad, why) in [
            (
                "Question: q?\nFollow up: a?\nIntermediate answer: b\n",
                "So the final answer",
            ),
            (
                "Question: q?\nFollow up: a?\nSo the final answer is: b\n",
                "followed by",
            ),
            (
                "Question: q?\nSo the final answer is: b\n",
                "no `Follow up:`",
            ),
            (
                "Question: q?\nFollow up: a?\nIntermediate answer:\nSo the final answer is: b\n",
                "followed by",
            ),
            (
                "Question: q?\nFollow up: a?\nIntermediate answer: b\nSo the final answer is:\n",
                "So the final answer",
            ),
        ] {
            let e = TeacherPrompt::parse(&format!("{head}{bad}"), "f").unwrap_err();
            assert!(
                e.to_string().contains("f:4") && e.to_string().contains(why),
                "{bad}: {e}"
            );
        }
        let mixed = format!("{head}{ok}\n[demonstration]\nQ: q?\nA: So the answer is: b.\n");
        let e = TeacherPrompt::parse(&mixed, "f").unwrap_err().to_string();
        assert!(e.contains("one framework") && e.contains("line 4"), "{e}");
    }
}
