//! Tests of the loop: fixtures shared by the framework and step-model tests (a list retriever,
//! a scripted step model, a hashing fake LM over a word-level tokenizer).

mod generator;
mod ircot;
mod lookup;
mod self_ask;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokenizers::Tokenizer;

use super::{StepModel, StepOutput, StepRequest};
use crate::error::{Error, Result};
use crate::generator::{Generator, LogitsMode, Sequence};
use crate::retrieval::{Hit, Retriever};

/// A retriever over a fixed list, scoring by the number of query words in title + text;
/// records every call.
pub(crate) struct ListRetriever {
    pub docs: Vec<(String, String, String)>,
    pub calls: Mutex<Vec<(String, usize, HashSet<String>)>>,
}

impl ListRetriever {
    pub fn new(n: usize) -> Self {
        ListRetriever {
            docs: (0..n)
                .map(|i| {
                    (
                        format!("d{i}"),
                        format!("Title {i}"),
                        format!("text of doc {i}"),
                    )
                })
                .collect(),
            calls: Mutex::new(Vec::new()),
        }
    }
}

impl Retriever for ListRetriever {
    fn retrieve(&self, query: &str, k: usize, exclude: &HashSet<String>) -> Result<Vec<Hit>> {
        if let Ok(mut c) = self.calls.lock() {
            c.push((query.to_string(), k, exclude.clone()));
        }
        let words: HashSet<String> = query.split_whitespace().map(|w| w.to_lowercase()).collect();
        let mut scored: Vec<Hit> = self
            .docs
            .iter()
            .filter(|d| !exclude.contains(&d.0))
            .map(|(id, title, text)| Hit {
                id: id.clone(),
                title: title.clone(),
                text: text.clone(),
                score: format!("{title} {text}")
                    .split_whitespace()
                    .filter(|w| words.contains(&w.to_lowercase()))
                    .count() as f32,
            })
            .collect();
        scored.sort_by(|a, b| b.score.total_cmp(&a.score));
        scored.truncate(k);
        Ok(scored)
    }
}

/// Answers from a script, one entry per step; records the requests' prompts.
pub(crate) struct Scripted {
    pub lines: Vec<&'static str>,
    pub prompts: Vec<(usize, bool, String)>,
    pub budget: Option<usize>,
}

impl StepModel for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn prompt_budget(&self, _: usize) -> Option<usize> {
        self.budget
    }
    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(text.split_whitespace().count())
    }
    fn generate(&mut self, req: &StepRequest<'_>) -> Result<StepOutput> {
        self.prompts
            .push((req.step, req.forced, req.prompt.to_string()));
        let text = self.lines.get(req.step - 1).copied().unwrap_or("x.");
        Ok(StepOutput {
            text: text.to_string(),
            new_tokens: text.split_whitespace().count(),
            ..StepOutput::default()
        })
    }
}

pub(crate) fn scripted(lines: Vec<&'static str>) -> Scripted {
    Scripted {
        lines,
        prompts: Vec::new(),
        budget: None,
    }
}

/// A deterministic fake LM over a real-looking vocabulary: its cache holds the tokens it was
/// fed, and the next token is a hash of the last few cached tokens, so a runtime that
/// mis-truncates the cache gets different text. It ends a sentence with `.` then EOS after
/// a length drawn from the hash.
pub(crate) struct HashLm {
    pub info: crate::generator::GeneratorInfo,
    pub words: Vec<u32>,
    pub period: u32,
    pub eos: u32,
    pub appended: Mutex<usize>,
    /// Model calls ([`Generator::append`]) so far.
    pub calls: Mutex<usize>,
    /// Copies like an induction head: the next token is the one that followed the latest
    /// earlier occurrence of the last two cached tokens, when there is one (what prompt-lookup
    /// decoding drafts), else the hash's.
    pub copy: bool,
}

/// Named tolerance: logits of the chosen token stand this far above the rest.
pub(crate) const FAKE_MARGIN: f32 = 4.0;

impl HashLm {
    fn next(&self, cache: &[u32]) -> u32 {
        if self.copy && cache.len() > 2 && cache.last() != Some(&self.period) {
            let n = cache.len();
            if let Some(s) = (0..n - 2)
                .rev()
                .find(|&s| cache[s..s + 2] == cache[n - 2..])
            {
                return cache[s + 2];
            }
        }
        let tail = &cache[cache.len().saturating_sub(6)..];
        let mut h: u64 = 1469598103934665603;
        for &t in tail {
            h = (h ^ u64::from(t)).wrapping_mul(1099511628211);
        }
        let last = cache.last().copied().unwrap_or(0);
        if last == self.period {
            return self.eos;
        }
        let since_prompt_like = h % 7;
        if since_prompt_like == 0 {
            self.period
        } else {
            self.words[(h as usize / 7) % self.words.len()]
        }
    }
}

impl Generator for HashLm {
    fn info(&self) -> &crate::generator::GeneratorInfo {
        &self.info
    }
    fn new_sequence(&self) -> Result<Sequence> {
        Ok(Sequence::new(Box::new(Vec::<u32>::new())))
    }
    fn append(
        &self,
        seq: &mut Sequence,
        tokens: &[u32],
        mode: LogitsMode,
    ) -> Result<crate::generator::Logits> {
        if let Ok(mut a) = self.appended.lock() {
            *a += tokens.len();
        }
        if let Ok(mut c) = self.calls.lock() {
            *c += 1;
        }
        let cache = seq
            .cache_mut()
            .downcast_mut::<Vec<u32>>()
            .ok_or(Error::ForeignSequence)?;
        let vocab = self.info.vocab_size;
        let mut data = Vec::new();
        let rows = if mode == LogitsMode::All {
            tokens.len()
        } else {
            1
        };
        let start = cache.len();
        cache.extend_from_slice(tokens);
        for r in 0..rows {
            let end = if mode == LogitsMode::All {
                start + r + 1
            } else {
                cache.len()
            };
            let next = self.next(&cache[..end]) as usize;
            let mut row = vec![0.0f32; vocab];
            row[next % vocab] = FAKE_MARGIN;
            data.extend(row);
        }
        seq.push_tokens(tokens);
        Ok(crate::generator::Logits { rows, vocab, data })
    }
    fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()> {
        let cache = seq
            .cache_mut()
            .downcast_mut::<Vec<u32>>()
            .ok_or(Error::ForeignSequence)?;
        cache.truncate(len);
        seq.truncate_tokens(len);
        Ok(())
    }
    fn fork(&self, seq: &Sequence, len: usize) -> Result<Sequence> {
        let cache = seq
            .cache
            .downcast_ref::<Vec<u32>>()
            .ok_or(Error::ForeignSequence)?;
        let len = len.min(cache.len());
        let mut out = Sequence::new(Box::new(cache[..len].to_vec()));
        out.push_tokens(&seq.tokens()[..len]);
        Ok(out)
    }
}

/// A word-level tokenizer over a small vocabulary, built in code.
pub(crate) fn word_tokenizer(words: &[&str]) -> Result<Tokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for w in ["[UNK]", "[EOS]"].iter().chain(words) {
        let n = vocab.len() as u32;
        vocab.entry(w.to_string()).or_insert(n);
    }
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut t = Tokenizer::new(model);
    t.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
    Ok(t)
}

/// The word tokenizer of the loop tests: the prompt's words, the answer phrase and the
/// numbers 0..20.
pub(crate) fn loop_tokenizer() -> Result<Tokenizer> {
    let mut words: Vec<String> = [
        "Wikipedia",
        "Title",
        ":",
        "Q",
        "A",
        "text",
        "of",
        "doc",
        "Which",
        "?",
        ".",
        "So",
        "the",
        "answer",
        "is",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    words.extend((0..20).map(|i| i.to_string()));
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    word_tokenizer(&refs)
}

/// A [`HashLm`] over [`loop_tokenizer`]'s ids.
pub(crate) fn hash_lm(tok: &Tokenizer) -> Result<HashLm> {
    let id = |w: &str| tok.token_to_id(w).ok_or_else(|| Error::Tokenizer(w.into()));
    Ok(HashLm {
        info: crate::generator::GeneratorInfo::new("hash-lm", tok.get_vocab_size(true), 4096)
            .with_providers(["CPU"]),
        words: ["text", "doc", "1", "2", "3", "of"]
            .iter()
            .map(|w| id(w))
            .collect::<Result<_>>()?,
        period: id(".")?,
        eos: id("[EOS]")?,
        appended: Mutex::new(0),
        calls: Mutex::new(0),
        copy: false,
    })
}
