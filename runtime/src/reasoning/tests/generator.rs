//! The generator step model: KV reuse, the prompt prefix, cancellation, end ids, statistics.

use std::sync::Arc;

use super::super::{
    reason, Decoding, GeneratorStepModel, LoopOptions, PromptPrefix, StepModel, StepRequest,
};
use super::{hash_lm, loop_tokenizer, word_tokenizer, ListRetriever, FAKE_MARGIN};
use crate::error::{Error, Result};
use crate::generator::{Generator, LogitsMode, Sequence};
use crate::sampling::softmax_stats;

#[test]
fn generator_step_model_reuses_the_prefix_and_gives_identical_answers() -> Result<()> {
    let tok = loop_tokenizer()?;
    let lm = hash_lm(&tok)?;
    let r = ListRetriever::new(20);
    let mut with = Vec::new();
    let mut without = Vec::new();
    for reuse in [true, false] {
        let mut m = GeneratorStepModel::new(&lm, &tok, &[lm.eos]).with_kv_reuse(reuse);
        let out = reason("Which doc ?", &r, &mut m, &LoopOptions::default())?;
        if reuse { &mut with } else { &mut without }.push(out);
    }
    let (a, b) = (&with[0], &without[0]);
    assert_eq!(a.answer, b.answer);
    assert_eq!(a.sentences(), b.sentences());
    assert_eq!(
        a.steps.len(),
        5,
        "the fake never answers: {:?}",
        a.sentences()
    );
    assert_eq!(b.reused_tokens(), 0);
    assert!(a.reused_tokens() > 0);
    assert_eq!(
        a.prefilled_tokens() + a.reused_tokens(),
        b.prefilled_tokens(),
        "same prompts either way"
    );
    assert!((a.prefilled_tokens() as f64) < 0.6 * b.prefilled_tokens() as f64);
    for s in &a.steps {
        let p = s
            .mean_prob
            .ok_or_else(|| Error::Internal("no prob".into()))?;
        assert!(p > 0.0 && p <= 1.0);
        assert!(s.mean_entropy.is_some_and(|h| h >= 0.0));
    }
    Ok(())
}

/// Few-shot demonstrations prefilled once ([`PromptPrefix`]): every question starts from a
/// copy of their cache, answers equal the ones of prefilling them with every question (the
/// [`crate::fewshot::Prefixed`] wrapper), and the demonstrations' tokens run through the
/// model once instead of once per question.
#[test]
fn the_generator_step_model_checks_the_cancel_token_of_its_request() -> Result<()> {
    let tok = loop_tokenizer()?;
    let lm = hash_lm(&tok)?;
    let mut m = GeneratorStepModel::new(&lm, &tok, &[]);
    let cancel = crate::control::Cancel::new();
    let mut req = StepRequest {
        question: "q",
        step: 1,
        forced: false,
        passages: &[],
        reasoning: &[],
        prompt: "Q : Which doc ? A :",
        max_new_tokens: 4,
        cancel: Some(&cancel),
    };
    m.begin_question("q")?;
    assert!(m.generate(&req).is_ok());
    cancel.cancel();
    assert!(matches!(m.generate(&req), Err(Error::Cancelled)));
    req.cancel = None;
    assert!(m.generate(&req).is_ok());
    Ok(())
}

#[test]
fn a_prompt_prefix_is_prefilled_once_and_changes_no_answer() -> Result<()> {
    let tok = loop_tokenizer()?;
    let lm = hash_lm(&tok)?;
    let demos =
        "Wikipedia Title : doc 7\ntext of doc 7 .\n\nQ : Which doc ?\nA : So the answer is 7 .\n\n";
    let questions = ["Which doc ?", "Which doc of 3 ?", "Which text of 12 ?"];
    let appended = || lm.appended.lock().map(|a| *a).unwrap_or(0);
    let r = ListRetriever::new(20);
    let opts = LoopOptions::default();

    let before = appended();
    let prefix = Arc::new(PromptPrefix::new(&lm, &tok, demos)?);
    let p = prefix.tokens();
    assert_eq!(
        appended() - before,
        p,
        "the prefix is prefilled on creation"
    );
    assert!(p > 10);
    let mut pinned = Vec::new();
    for q in questions {
        let mut m =
            GeneratorStepModel::new(&lm, &tok, &[lm.eos]).with_prompt_prefix(Arc::clone(&prefix));
        pinned.push(reason(q, &r, &mut m, &opts)?);
    }
    let pinned_appended = appended() - before - p;

    let before = appended();
    let mut each = Vec::new();
    for q in questions {
        let m = GeneratorStepModel::new(&lm, &tok, &[lm.eos]);
        let mut m = crate::fewshot::Prefixed::new(m, demos.to_string())?;
        each.push(reason(q, &r, &mut m, &opts)?);
    }
    let each_appended = appended() - before;

    for (a, b) in pinned.iter().zip(&each) {
        assert_eq!(a.answer, b.answer);
        assert_eq!(a.sentences(), b.sentences());
        assert_eq!(
            a.prefilled_tokens() + p,
            b.prefilled_tokens(),
            "the first step of a question reuses the whole prefix"
        );
        assert!(a.steps.len() > 1);
    }
    assert_eq!(
        each_appended - pinned_appended,
        questions.len() * p,
        "the prefix runs once, not once per question"
    );
    // The prompt budget leaves room for the prefix.
    let m = GeneratorStepModel::new(&lm, &tok, &[lm.eos]).with_prompt_prefix(prefix);
    assert_eq!(m.prompt_budget(100), Some(4096 - 100 - p));
    Ok(())
}

/// A model whose most likely next token is always EOS, with `word` second.
struct EosFirstLm {
    info: crate::generator::GeneratorInfo,
    eos: u32,
    word: u32,
}

impl Generator for EosFirstLm {
    fn info(&self) -> &crate::generator::GeneratorInfo {
        &self.info
    }
    fn new_sequence(&self) -> Result<Sequence> {
        Ok(Sequence::new(Box::new(())))
    }
    fn append(
        &self,
        seq: &mut Sequence,
        tokens: &[u32],
        _mode: LogitsMode,
    ) -> Result<crate::generator::Logits> {
        seq.push_tokens(tokens);
        let vocab = self.info.vocab_size;
        let mut data = vec![0.0f32; vocab];
        data[self.eos as usize] = 2.0 * FAKE_MARGIN;
        data[self.word as usize] = FAKE_MARGIN;
        Ok(crate::generator::Logits {
            rows: 1,
            vocab,
            data,
        })
    }
    fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()> {
        seq.truncate_tokens(len);
        Ok(())
    }
}

#[test]
fn a_sentence_ends_at_each_of_several_eos_ids() -> Result<()> {
    let tok = word_tokenizer(&["Q", ":", "A", "doc", "?"])?;
    let id = |w: &str| tok.token_to_id(w).ok_or_else(|| Error::Tokenizer(w.into()));
    // A Llama-3.x-style manifest lists several end ids; the model ends with either one.
    let eos_ids = [id("[EOS]")?, id("A")?];
    for &end in &eos_ids {
        let lm = EosFirstLm {
            info: crate::generator::GeneratorInfo::new("eos-first", tok.get_vocab_size(true), 64)
                .with_providers(["CPU"]),
            eos: end,
            word: id("doc")?,
        };
        let mut m = GeneratorStepModel::new(&lm, &tok, &eos_ids);
        m.begin_question("doc ?")?;
        let out = m.generate(&StepRequest {
            question: "doc ?",
            step: 1,
            forced: false,
            passages: &[],
            reasoning: &[],
            prompt: "Q : doc ? A :",
            max_new_tokens: 8,
            cancel: None,
        })?;
        assert_eq!(
            (out.text.as_str(), out.new_tokens),
            ("doc", 1),
            "end id {end}"
        );
        // With only the other id listed, this one does not end the sentence.
        let other: Vec<u32> = eos_ids.iter().copied().filter(|&e| e != end).collect();
        let mut m = GeneratorStepModel::new(&lm, &tok, &other);
        m.begin_question("doc ?")?;
        let out = m.generate(&StepRequest {
            question: "doc ?",
            step: 1,
            forced: false,
            passages: &[],
            reasoning: &[],
            prompt: "Q : doc ? A :",
            max_new_tokens: 8,
            cancel: None,
        })?;
        assert!(
            out.new_tokens > 1,
            "end id {end} not listed: {} tokens",
            out.new_tokens
        );
    }
    Ok(())
}

#[test]
fn a_step_never_ends_before_its_first_token() -> Result<()> {
    /// Named tolerance: f32 logits through an f64 softmax.
    const PROB_EPS: f64 = 1e-6;
    let tok = word_tokenizer(&["Q", ":", "A", "doc", "?"])?;
    let id = |w: &str| tok.token_to_id(w).ok_or_else(|| Error::Tokenizer(w.into()));
    let lm = EosFirstLm {
        info: crate::generator::GeneratorInfo::new("eos-first", tok.get_vocab_size(true), 64)
            .with_providers(["CPU"]),
        eos: id("[EOS]")?,
        word: id("doc")?,
    };
    for decoding in [
        Decoding::Greedy,
        Decoding::Sample {
            temperature: 0.05,
            seed: 7,
        },
    ] {
        let mut m = GeneratorStepModel::new(&lm, &tok, &[lm.eos]).with_decoding(decoding);
        m.begin_question("doc ?")?;
        let out = m.generate(&StepRequest {
            question: "doc ?",
            step: 1,
            forced: false,
            passages: &[],
            reasoning: &[],
            prompt: "Q : doc ? A :",
            max_new_tokens: 8,
            cancel: None,
        })?;
        // EOS is refused as the first token, then taken as the second.
        assert_eq!(
            (out.text.as_str(), out.new_tokens),
            ("doc", 1),
            "{decoding:?}"
        );
        // The statistics are those of the model's own distribution (EOS not masked): the
        // mean of p("doc") and p(EOS) over the unmasked softmax.
        let v = tok.get_vocab_size(true) as f64;
        let (e8, e4) = (
            (2.0 * f64::from(FAKE_MARGIN)).exp(),
            f64::from(FAKE_MARGIN).exp(),
        );
        let want = (e8 + e4) / (2.0 * (e8 + e4 + v - 2.0));
        let got = out
            .mean_prob
            .ok_or_else(|| Error::Internal("no prob".into()))?;
        assert!(
            (got - want).abs() < PROB_EPS,
            "{got} vs {want} ({decoding:?})"
        );
    }
    Ok(())
}

#[test]
fn softmax_stats_are_exact_on_a_uniform_row() -> Result<()> {
    /// Named tolerance for f64 sums of four terms.
    const EPS: f64 = 1e-12;
    let s = softmax_stats(&[1.0, 1.0, 1.0, 1.0])?;
    assert!((s.entropy - 4f64.ln()).abs() < EPS);
    assert!(((1.0f64).exp().ln() - 1.0).abs() < EPS);
    assert!(softmax_stats(&[]).is_err());
    Ok(())
}
