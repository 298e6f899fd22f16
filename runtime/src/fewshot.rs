//! Few-shot demonstrations put before the step prompt: IRCoT's hand-written CoT examples
//! (`ircot_prompts/<dataset>.txt`), for running a base model that has not been taught the step
//! format, and for LLM teachers.
//!
//! IRCoT's file format: blocks that each start with a `# METADATA: {...}` line, followed by
//! `Wikipedia Title:` paragraphs, a `Q:` line and an `A:` line whose reasoning ends with
//! `So the answer is: …`. The demonstrations are the student's template, so a demonstration,
//! a blank line and then the step prompt read as one more worked example to continue.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::reasoning::{StepModel, StepOutput, StepRequest};

/// Parses IRCoT demonstrations from `text`; `origin` names the file in errors (with the line).
pub fn parse_ircot(text: &str, origin: &Path) -> Result<Vec<String>> {
    let bad = |line: usize, message: String| Error::BadLine {
        path: origin.to_path_buf(),
        line,
        message,
    };
    let mut blocks: Vec<(usize, Vec<&str>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("# METADATA:") {
            blocks.push((i + 1, Vec::new()));
        } else if let Some((_, lines)) = blocks.last_mut() {
            lines.push(line);
        } else if !line.trim().is_empty() {
            return Err(bad(
                i + 1,
                "text before the first `# METADATA:` line (expected IRCoT's prompt format)".into(),
            ));
        }
    }
    if blocks.is_empty() {
        return Err(bad(
            1,
            "no `# METADATA:` line (expected IRCoT's prompt format)".into(),
        ));
    }
    let mut out = Vec::with_capacity(blocks.len());
    for (n, lines) in blocks {
        let d = lines.join("\n").trim().to_string();
        if !d.lines().any(|l| l.starts_with("Q: ")) {
            return Err(bad(n, "demonstration has no `Q: ` line".into()));
        }
        let answered = d
            .lines()
            .rev()
            .find(|l| l.starts_with("A:"))
            .is_some_and(|a| crate::answer::extract_answer(a.trim_start_matches("A:")).is_some());
        if !answered {
            return Err(bad(
                n,
                "demonstration has no `A:` line ending with an answer sentence (expected `A: ... So the answer is: X.`)".into(),
            ));
        }
        out.push(d);
    }
    Ok(out)
}

/// Reads an IRCoT prompt file and keeps its first `n` demonstrations (all when `None`; more
/// than the file has is an error).
pub fn load_ircot(path: &Path, n: Option<usize>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut d = parse_ircot(&text, path)?;
    if let Some(n) = n {
        if n > d.len() {
            return Err(Error::TooFewDemonstrations {
                path: path.to_path_buf(),
                asked: n,
                available: d.len(),
            });
        }
        d.truncate(n);
    }
    Ok(d)
}

/// Parses `PATH` or `PATH:N` (the first N demonstrations of an IRCoT file).
pub fn parse_spec(spec: &str) -> (PathBuf, Option<usize>) {
    match spec.rsplit_once(':') {
        Some((p, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (PathBuf::from(p), n.parse().ok())
        }
        _ => (PathBuf::from(spec), None),
    }
}

/// The text put before a step prompt: each demonstration followed by a blank line.
pub fn prefix(demonstrations: &[String]) -> String {
    let mut s = String::new();
    for d in demonstrations {
        s.push_str(d);
        s.push_str("\n\n");
    }
    s
}

/// A [`StepModel`] whose prompts are preceded by a fixed text (few-shot demonstrations). The
/// loop fits its prompt into the inner model's budget minus the prefix, so prefix + prompt
/// still fits the context. Because the prefix is the same at every step, cross-step KV reuse
/// keeps it cached.
pub struct Prefixed<M> {
    inner: M,
    prefix: String,
    prefix_tokens: usize,
}

impl<M: StepModel> Prefixed<M> {
    /// Wraps `inner`; counts the prefix's tokens with it.
    pub fn new(inner: M, prefix: String) -> Result<Self> {
        let prefix_tokens = inner.count_tokens(&prefix)?;
        Ok(Prefixed {
            inner,
            prefix,
            prefix_tokens,
        })
    }

    /// The wrapped model.
    pub fn inner(&self) -> &M {
        &self.inner
    }
}

impl<M: StepModel> StepModel for Prefixed<M> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn prompt_budget(&self, max_new_tokens: usize) -> Option<usize> {
        self.inner
            .prompt_budget(max_new_tokens)
            .map(|b| b.saturating_sub(self.prefix_tokens))
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        self.inner.count_tokens(text)
    }

    fn begin_question(&mut self, question: &str) -> Result<()> {
        self.inner.begin_question(question)
    }

    fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput> {
        let prompt = format!("{}{}", self.prefix, req.prompt);
        let inner = StepRequest {
            prompt: &prompt,
            ..*req
        };
        self.inner.generate(&inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "# METADATA: {\"qid\": \"a\"}\nWikipedia Title: X\nx is y.\n\nQ: What is x?\nA: x is y. So the answer is: y.\n\n\n# METADATA: {\"qid\": \"b\"}\nWikipedia Title: Z\nz.\n\nQ: z?\nA: So the answer is: z.\n";

    #[test]
    fn parses_blocks_and_names_bad_lines() -> Result<()> {
        let d = parse_ircot(TWO, Path::new("f"))?;
        assert_eq!(d.len(), 2);
        assert!(d[0].starts_with("Wikipedia Title: X") && d[0].ends_with("answer is: y."));
        assert_eq!(
            prefix(&d[..1]),
            "Wikipedia Title: X\nx is y.\n\nQ: What is x?\nA: x is y. So the answer is: y.\n\n"
        );
        let e = parse_ircot("# METADATA: {}\nQ: a\nA: b.\n", Path::new("g")).unwrap_err();
        assert!(e.to_string().starts_with("g:1:"), "{e}");
        let e = parse_ircot("hello\n", Path::new("h")).unwrap_err();
        assert!(e.to_string().starts_with("h:1:"), "{e}");
        assert_eq!(parse_spec("a/b.txt:2"), (PathBuf::from("a/b.txt"), Some(2)));
        assert_eq!(parse_spec("a/b.txt"), (PathBuf::from("a/b.txt"), None));
        Ok(())
    }

    /// The real IRCoT files in the repository's data/ircot_prompts hold 29 / 20 / 20
    /// demonstrations.
    #[test]
    fn real_ircot_files_parse() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ircot_prompts");
        for (name, n) in [("hotpotqa", 29), ("musique", 20), ("2wikimultihopqa", 20)] {
            let d = load_ircot(&dir.join(format!("{name}.txt")), None)?;
            assert_eq!(d.len(), n, "{name}");
            assert!(
                d.iter().all(|x| x.starts_with("Wikipedia Title: ")),
                "{name}"
            );
        }
        assert_eq!(load_ircot(&dir.join("musique.txt"), Some(2))?.len(), 2);
        assert!(load_ircot(&dir.join("musique.txt"), Some(21)).is_err());
        Ok(())
    }

    struct Echo(Vec<String>);

    impl StepModel for Echo {
        fn name(&self) -> &str {
            "echo"
        }
        fn prompt_budget(&self, _: usize) -> Option<usize> {
            Some(100)
        }
        fn count_tokens(&self, text: &str) -> Result<usize> {
            Ok(text.split_whitespace().count())
        }
        fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput> {
            self.0.push(req.prompt.to_string());
            Ok(StepOutput::default())
        }
    }

    #[test]
    fn prefixed_model_sees_the_prefix_and_a_smaller_budget() -> Result<()> {
        let mut m = Prefixed::new(Echo(Vec::new()), "one two three\n\n".into())?;
        assert_eq!(m.prompt_budget(10), Some(97));
        let req = StepRequest {
            question: "q",
            step: 1,
            forced: false,
            passages: &[],
            reasoning: &[],
            prompt: "Q: q\nA:",
            max_new_tokens: 8,
            cancel: None,
        };
        m.generate(&req)?;
        assert_eq!(m.inner().0, vec!["one two three\n\nQ: q\nA:".to_string()]);
        Ok(())
    }
}
