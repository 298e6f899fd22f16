//! The annotation-derived teacher (see the module docs of [`crate::teacher`]).

use std::collections::{HashMap, HashSet};

use steper_runtime::data::QaExample;
use steper_runtime::{StepModel, StepOutput, StepRequest};

use super::budget::{prompt_budget_methods, PromptBudget};

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

/// Splits text into sentences with the runtime's rule (the one the loop applies to what a model
/// generates), so a stated sentence survives the loop's first-sentence cut unchanged.
pub fn sentences(text: &str) -> Vec<String> {
    steper_runtime::answer::split_sentences(text)
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// What the gold teacher based its sentences on, counted over every question it has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GoldStats {
    /// Steps that stated an annotated supporting sentence (HotpotQA / 2Wiki `supporting_sentences`).
    pub annotated_steps: usize,
    /// Steps that stated a sentence derived from MuSiQue's `question_decomposition` (the
    /// sentence of the sub-question's paragraph that contains the sub-answer).
    pub decomposition_steps: usize,
    /// Steps that stated a heuristically chosen sentence: a supporting paragraph without
    /// sentence annotation, with its annotated sentences cut from the prompt, or no new gold
    /// paragraph retrieved (the sentence then serves as the next query).
    pub fallback_steps: usize,
    /// Steps that stated the answer.
    pub answer_steps: usize,
    /// `supporting_sentences` indices past the paragraph's last sentence (skipped).
    pub out_of_range_indices: usize,
    /// Annotated sentences that the context-fitted prompt did not show (never stated).
    pub hidden_facts: usize,
}

/// The annotation-derived teacher.
pub struct GoldTeacher {
    example: Option<QaExample>,
    /// Gold titles, in order.
    gold: Vec<String>,
    /// Per gold title: the sentences to state and where they come from.
    facts: HashMap<String, (Vec<String>, Source)>,
    /// Sentences stated in this question (whitespace-normalized).
    stated: HashSet<String>,
    /// Gold titles done with.
    used: Vec<String>,
    budget: PromptBudget,
    stats: GoldStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Annotated,
    Decomposition,
}

/// Collapses runs of whitespace to one space and trims.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl GoldTeacher {
    /// A teacher with no token budget (prompts are never cut).
    pub fn new() -> Self {
        GoldTeacher {
            example: None,
            gold: Vec::new(),
            facts: HashMap::new(),
            stated: HashSet::new(),
            used: Vec::new(),
            budget: PromptBudget::default(),
            stats: GoldStats::default(),
        }
    }

    /// Fits prompts into `budget` tokens of `tokenizer` (the student's), so that the records it
    /// yields fit the student's context.
    pub fn with_budget(mut self, tokenizer: tokenizers::Tokenizer, budget: usize) -> Self {
        self.budget = PromptBudget::new(tokenizer, budget);
        self
    }

    /// What the sentences so far were based on.
    pub fn stats(&self) -> &GoldStats {
        &self.stats
    }

    /// Sets the question the next loop run is about: its answers, supporting titles and the
    /// annotated evidence of each supporting paragraph (sentence indices, or MuSiQue's
    /// decomposition).
    pub fn set_example(&mut self, ex: &QaExample) {
        self.gold = ex.gold_titles();
        self.facts.clear();
        for p in &ex.paragraphs {
            if !self.gold.contains(&p.title) || self.facts.contains_key(&p.title) {
                continue;
            }
            let (facts, bad) = p.supporting_facts();
            self.stats.out_of_range_indices += bad;
            if !facts.is_empty() {
                self.facts
                    .insert(p.title.clone(), (facts, Source::Annotated));
            }
        }
        for (title, sentence) in decomposition_facts(ex) {
            let e = self
                .facts
                .entry(title)
                .or_insert_with(|| (Vec::new(), Source::Decomposition));
            if e.1 == Source::Decomposition && !e.0.contains(&sentence) {
                e.0.push(sentence);
            }
        }
        self.example = Some(ex.clone());
        self.used.clear();
        self.stated.clear();
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

    /// The next sentence of evidence among the held passages, if any: the first unstated
    /// annotated sentence of the earliest-held gold paragraph not yet done with.
    fn next_evidence(&mut self, req: &StepRequest<'_>) -> Option<String> {
        let shown = squash(req.prompt);
        for p in req.passages {
            if !self.gold.contains(&p.title) || self.used.contains(&p.title) {
                continue;
            }
            let Some((facts, source)) = self.facts.get(&p.title).cloned() else {
                // A supporting paragraph without annotation: its most relevant sentence.
                self.used.push(p.title.clone());
                self.stats.fallback_steps += 1;
                return Some(self.best_sentence(req.question, &p.text));
            };
            let pending: Vec<&String> = facts
                .iter()
                .filter(|f| !self.stated.contains(&squash(f)))
                .collect();
            let visible: Vec<&&String> = pending
                .iter()
                .filter(|f| shown.contains(&squash(f)))
                .collect();
            match visible.first() {
                Some(f) => {
                    let f = (**f).clone();
                    self.stated.insert(squash(&f));
                    if visible.len() == 1 {
                        self.stats.hidden_facts += pending.len() - 1;
                        self.used.push(p.title.clone());
                    }
                    match source {
                        Source::Annotated => self.stats.annotated_steps += 1,
                        Source::Decomposition => self.stats.decomposition_steps += 1,
                    }
                    return Some(f);
                }
                None => {
                    // Its evidence was cut from the prompt: the best sentence that is shown.
                    self.stats.hidden_facts += pending.len();
                    self.used.push(p.title.clone());
                    self.stats.fallback_steps += 1;
                    let shown_text = shown_part(&p.text, &shown);
                    return Some(self.best_sentence(req.question, &shown_text));
                }
            }
        }
        None
    }
}

/// The words of `text` from its start that appear in `shown` (the prompt shows a capped prefix
/// of each passage).
fn shown_part(text: &str, shown: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut n = words.len();
    while n > 0 && !shown.contains(&words[..n].join(" ")) {
        n /= 2;
    }
    words[..n].join(" ")
}

/// MuSiQue's decomposition as evidence: for each sub-question, the title of the paragraph it is
/// answered from (`paragraph_support_idx`) and that paragraph's first sentence containing the
/// sub-answer. Sub-steps without such a sentence give nothing.
fn decomposition_facts(ex: &QaExample) -> Vec<(String, String)> {
    let Some(steps) = ex
        .extra
        .get("question_decomposition")
        .and_then(|v| v.as_array())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for st in steps {
        let idx = st.get("paragraph_support_idx").and_then(|v| v.as_u64());
        let answer = st.get("answer").and_then(|v| v.as_str()).unwrap_or("");
        let Some(p) = idx.and_then(|i| ex.paragraphs.get(i as usize)) else {
            continue;
        };
        if answer.trim().is_empty() {
            continue;
        }
        let a = answer.to_lowercase();
        if let Some(s) = sentences(&p.text)
            .into_iter()
            .find(|s| s.to_lowercase().contains(&a))
        {
            out.push((p.title.clone(), s));
        }
    }
    out
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

    prompt_budget_methods!();

    fn begin_question(&mut self, _question: &str) -> steper_runtime::Result<()> {
        self.used.clear();
        self.stated.clear();
        Ok(())
    }

    fn generate(&mut self, req: &StepRequest<'_>) -> steper_runtime::Result<StepOutput> {
        let complete = |t: &Self| !t.gold.is_empty() && t.gold.iter().all(|g| t.used.contains(g));
        let text = if req.forced {
            if complete(self) {
                self.stats.answer_steps += 1;
                format!("{}.", self.answer())
            } else {
                "unknown.".to_string()
            }
        } else if complete(self) {
            self.stats.answer_steps += 1;
            format!("So the answer is: {}.", self.answer())
        } else {
            match self.next_evidence(req) {
                Some(s) => s,
                None => {
                    // No new evidence held: restate the most relevant sentence of the newest
                    // passage (it becomes the next query).
                    self.stats.fallback_steps += 1;
                    req.passages
                        .last()
                        .map(|p| self.best_sentence(req.question, &p.text))
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

    use steper_runtime::data::PromptPassage;

    const EX: &str = r#"{"id":"q","question":"Which band of the singer of Song X was formed first?","answers":["Band Y"],"paragraphs":[
        {"title":"Noise","text":"Noise is loud. It is here.","is_supporting":false},
        {"title":"Song X","text":"Song X is a song. It was sung by Ann Lee. It charted.","is_supporting":true,"sentences":["Song X is a song."," It was sung by Ann Lee.","  It charted."],"supporting_sentences":[1,0,9]},
        {"title":"Ann Lee","text":"Ann Lee is a singer. She founded Band Y in 1990.","is_supporting":true,"sentences":["Ann Lee is a singer."," She founded Band Y in 1990."],"supporting_sentences":[1]}]}"#;

    fn req<'a>(
        q: &'a str,
        ps: &'a [PromptPassage],
        prompt: &'a str,
        forced: bool,
    ) -> StepRequest<'a> {
        StepRequest {
            question: q,
            step: 1,
            forced,
            passages: ps,
            reasoning: &[],
            prompt,
            max_new_tokens: 32,
            cancel: None,
        }
    }

    /// With the evidence retrieved, the teacher states exactly the annotated sentences (in
    /// index order, paragraphs in the order they are held), then the answer; the out-of-range
    /// index is counted, not fatal.
    #[test]
    fn states_exactly_the_annotated_sentences() -> steper_runtime::Result<()> {
        let ex: QaExample = serde_json::from_str(&EX.replace('\n', ""))
            .map_err(|e| steper_runtime::Error::Internal(e.to_string()))?;
        let mut t = GoldTeacher::new();
        t.set_example(&ex);
        let ps: Vec<PromptPassage> = ex
            .paragraphs
            .iter()
            .rev()
            .map(|p| PromptPassage {
                title: p.title.clone(),
                text: p.text.clone(),
            })
            .collect();
        let prompt = steper_runtime::prompt::render(&ex.question, &ps, &[], 100);
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(t.generate(&req(&ex.question, &ps, &prompt, false))?.text);
        }
        assert_eq!(
            out,
            vec![
                "She founded Band Y in 1990.",
                "Song X is a song.",
                "It was sung by Ann Lee.",
                "So the answer is: Band Y."
            ]
        );
        let st = t.stats();
        assert_eq!(
            (st.annotated_steps, st.answer_steps, st.fallback_steps),
            (3, 1, 0)
        );
        assert_eq!(st.out_of_range_indices, 1);
        // Only one gold paragraph held: its facts, then a fallback query, never the answer.
        t.set_example(&ex);
        let one = vec![ps[2].clone(), ps[1].clone()];
        let prompt = steper_runtime::prompt::render(&ex.question, &one, &[], 100);
        let a = t.generate(&req(&ex.question, &one, &prompt, false))?.text;
        let b = t.generate(&req(&ex.question, &one, &prompt, false))?.text;
        let c = t.generate(&req(&ex.question, &one, &prompt, false))?.text;
        assert_eq!(
            (a.as_str(), b.as_str()),
            ("Song X is a song.", "It was sung by Ann Lee.")
        );
        assert!(!c.contains("answer is"), "{c}");
        assert_eq!(
            t.generate(&req(&ex.question, &one, &prompt, true))?.text,
            "unknown."
        );
        Ok(())
    }

    /// An annotated sentence the prompt does not show (passage capped) is never stated.
    #[test]
    fn hidden_facts_are_not_stated() -> steper_runtime::Result<()> {
        let ex: QaExample = serde_json::from_str(&EX.replace('\n', ""))
            .map_err(|e| steper_runtime::Error::Internal(e.to_string()))?;
        let mut t = GoldTeacher::new();
        t.set_example(&ex);
        let ps = vec![PromptPassage {
            title: "Ann Lee".into(),
            text: ex.paragraphs[2].text.clone(),
        }];
        let prompt = steper_runtime::prompt::render(&ex.question, &ps, &[], 4);
        let s = t.generate(&req(&ex.question, &ps, &prompt, false))?.text;
        assert_ne!(s, "She founded Band Y in 1990.");
        assert_eq!(t.stats().hidden_facts, 1);
        assert_eq!(t.stats().fallback_steps, 1);
        Ok(())
    }

    /// MuSiQue: the sentence of each sub-question's paragraph that contains its sub-answer.
    #[test]
    fn musique_decomposition_gives_the_sub_answer_sentences() -> steper_runtime::Result<()> {
        let line = r#"{"id":"m","question":"Who founded the label of X?","answers":["Bo"],"paragraphs":[{"title":"X","text":"X is an album. It was released by Zed Records.","is_supporting":true},{"title":"Zed Records","text":"Zed Records is a label. It was founded by Bo.","is_supporting":true}],"question_decomposition":[{"question":"label of X?","answer":"Zed Records","paragraph_support_idx":0},{"question":"founder of #1?","answer":"Bo","paragraph_support_idx":1}]}"#;
        let ex: QaExample = serde_json::from_str(line)
            .map_err(|e| steper_runtime::Error::Internal(e.to_string()))?;
        let mut t = GoldTeacher::new();
        t.set_example(&ex);
        let ps: Vec<PromptPassage> = ex
            .paragraphs
            .iter()
            .map(|p| PromptPassage {
                title: p.title.clone(),
                text: p.text.clone(),
            })
            .collect();
        let prompt = steper_runtime::prompt::render(&ex.question, &ps, &[], 100);
        let a = t.generate(&req(&ex.question, &ps, &prompt, false))?.text;
        let b = t.generate(&req(&ex.question, &ps, &prompt, false))?.text;
        let c = t.generate(&req(&ex.question, &ps, &prompt, false))?.text;
        assert_eq!(a, "It was released by Zed Records.");
        assert_eq!(b, "It was founded by Bo.");
        assert_eq!(c, "So the answer is: Bo.");
        assert_eq!(t.stats().decomposition_steps, 2);
        Ok(())
    }

    #[test]
    fn splits_sentences() {
        assert_eq!(
            sentences("A b. C d! E f? G"),
            vec!["A b.", "C d!", "E f?", "G"]
        );
        assert_eq!(
            sentences("Mr. Smith went. It rained."),
            vec!["Mr. Smith went.", "It rained."]
        );
    }
}
