//! The Self-Ask loop on the tiny exported student (ONNX Runtime and tract) and what its prompts
//! leave to cross-step KV reuse.
//!
//! - With reuse on and off the loop gives the same answers, sub-questions and intermediate
//!   answers; the prompts are the same either way (prefilled + reused with reuse = prefilled
//!   without); the reuse ratio is printed. Once through the engine as the model runs it (the
//!   tiny student was trained on IRCoT steps, so it mostly gets its answers forced), once with
//!   scripted follow-ups that the model answers from the passages retrieved for them.
//! - A four-hop run's prompts tokenized with SmolLM2's tokenizer, plain and inside a ChatML
//!   template: the tokens re-prefilled per generation, printed, and bounded.
#![cfg(all(feature = "ort", feature = "tract", feature = "bm25"))]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use steper_runtime::backend::load_model;
use steper_runtime::data::{PromptPassage, QaExample, Stage};
use steper_runtime::eval::{evaluate, evaluate_batched, EvalOptions};
use steper_runtime::prompt::{ChatTemplate, PromptLayout};
use steper_runtime::{
    reason, BackendKind, Bm25Index, Engine, Framework, GeneratorStepModel, LoopOptions, OrtOptions,
    Reasoning, StepModel, StepOutput, StepRequest,
};
use tokenizers::Tokenizer;

/// Questions of the tiny world's dev split run per backend.
const QUESTIONS: usize = 8;

/// Share of prompt tokens the tiny student's Self-Ask runs must take from the cache.
const MIN_REUSE: f64 = 0.3;

fn backends() -> [BackendKind; 2] {
    [
        BackendKind::Ort(OrtOptions::default().with_intra_threads(1)),
        BackendKind::Tract,
    ]
}

fn dev_questions() -> Result<Vec<QaExample>> {
    let mut qa = steper_test_support::tiny()?.questions("dev")?;
    qa.truncate(QUESTIONS);
    anyhow::ensure!(
        qa.len() == QUESTIONS,
        "the tiny world has too few dev questions"
    );
    Ok(qa)
}

/// Asserts that two runs of the same questions, with reuse (`on`) and without (`off`), agree;
/// returns (prefilled with reuse, prefilled without).
fn same_runs(on: &[Reasoning], off: &[Reasoning]) -> Result<(usize, usize)> {
    for (a, b) in on.iter().zip(off) {
        assert_eq!(a.answer, b.answer, "{}", a.question);
        let sa: Vec<(&str, &str)> = a
            .steps
            .iter()
            .map(|s| (s.query.as_str(), s.sentence.as_str()))
            .collect();
        let sb: Vec<(&str, &str)> = b
            .steps
            .iter()
            .map(|s| (s.query.as_str(), s.sentence.as_str()))
            .collect();
        assert_eq!(sa, sb, "{}", a.question);
        assert_eq!(b.reused_tokens(), 0);
        assert_eq!(
            a.prefilled_tokens() + a.reused_tokens(),
            b.prefilled_tokens(),
            "the same prompts either way: {}",
            a.question
        );
    }
    let sum = |rs: &[Reasoning]| rs.iter().map(Reasoning::prefilled_tokens).sum::<usize>();
    Ok((sum(on), sum(off)))
}

#[test]
fn kv_reuse_gives_the_answers_of_re_prefilling_through_the_engine() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let qa = dev_questions()?;
    for backend in backends() {
        let name = backend.name();
        let engine = Engine::builder()
            .model_dir(&tiny.export)
            .backend(backend)
            .index(&tiny.index)
            .build()
            .with_context(|| format!("loading {} on {name}", tiny.export.display()))?;
        let mut runs = Vec::new();
        for reuse in [true, false] {
            let mut opts = engine.default_options().with_kv_reuse(reuse);
            opts.loop_options = opts.loop_options.with_framework(Framework::SelfAsk);
            let mut rs = Vec::new();
            for q in &qa {
                rs.push(engine.reason(&q.question, &opts)?);
            }
            runs.push(rs);
        }
        let (on, off) = same_runs(&runs[0], &runs[1])?;
        let steps: usize = runs[0].iter().map(|r| r.steps.len()).sum();
        let forced = runs[0].iter().filter(|r| r.forced).count();
        println!(
            "{name}: self-ask through the engine, {QUESTIONS} questions, {steps} steps, {forced} forced: prefilled {on} tokens with reuse, {off} without (reuse ratio {:.3})",
            1.0 - on as f64 / off as f64
        );
        for r in &runs[0] {
            assert_eq!(r.steps.last().map(|s| s.stage), Some(Stage::Aggregate));
        }
    }
    Ok(())
}

/// The batched evaluation drives a Self-Ask step's generations (ask, then forced or answer) as
/// one question at a time does.
#[test]
fn batched_self_ask_answers_equal_one_at_a_time() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let qa = dev_questions()?;
    let engine = Engine::builder()
        .model_dir(&tiny.export)
        .backend(backends()[0].clone())
        .index(&tiny.index)
        .build()?;
    let mut opts = engine.default_options();
    opts.loop_options = opts.loop_options.with_framework(Framework::SelfAsk);
    let eval = EvalOptions::default();
    let (_, one) = evaluate(&engine, &qa, &opts, &eval, None)?;
    let (_, batched) = evaluate_batched(&engine, &qa, &opts, &eval, None, 3)?;
    for (a, b) in one.iter().zip(&batched) {
        assert_eq!((&a.error, &b.error), (&None, &None), "{}", a.id);
        assert_eq!(a.prediction, b.prediction, "{}", a.id);
        let sa: Vec<_> = a
            .trace
            .iter()
            .map(|s| (&s.sentence, s.new_tokens, s.prompt_tokens))
            .collect();
        let sb: Vec<_> = b
            .trace
            .iter()
            .map(|s| (&s.sentence, s.new_tokens, s.prompt_tokens))
            .collect();
        assert_eq!(sa, sb, "{}", a.id);
    }
    Ok(())
}

/// Asks scripted follow-ups (`Who is {title}?` for each supporting paragraph of the question)
/// and lets the model answer them and give the final answer.
struct ScriptedAsks<'a> {
    inner: GeneratorStepModel<'a>,
    asks: Vec<String>,
    asked: usize,
}

impl StepModel for ScriptedAsks<'_> {
    fn name(&self) -> &str {
        "scripted-asks"
    }
    fn prompt_budget(&self, n: usize) -> Option<usize> {
        self.inner.prompt_budget(n)
    }
    fn count_tokens(&self, text: &str) -> steper_runtime::Result<usize> {
        self.inner.count_tokens(text)
    }
    fn begin_question(&mut self, question: &str) -> steper_runtime::Result<()> {
        self.asked = 0;
        self.inner.begin_question(question)
    }
    fn generate(&mut self, req: &StepRequest<'_>) -> steper_runtime::Result<StepOutput> {
        // The model runs every generation, so its cache is what the next one reuses.
        let mut out = self.inner.generate(req)?;
        if !req.forced && req.prompt.ends_with('\n') {
            out.text = self.asks.get(self.asked).cloned().unwrap_or_default();
            self.asked += 1;
        }
        Ok(out)
    }
}

#[test]
fn kv_reuse_gives_the_answers_of_re_prefilling_over_scripted_hops() -> Result<()> {
    let tiny = steper_test_support::tiny()?;
    let qa = dev_questions()?;
    let index = Bm25Index::open(&tiny.index)?;
    let opts = LoopOptions::default().with_framework(Framework::SelfAsk);
    for backend in backends() {
        let name = backend.name();
        let m = load_model(&tiny.export, &backend)?;
        let mut runs = Vec::new();
        for reuse in [true, false] {
            let mut rs = Vec::new();
            for q in &qa {
                let asks: Vec<String> = q
                    .paragraphs
                    .iter()
                    .filter(|p| p.is_supporting == Some(true))
                    .map(|p| format!("Follow up: Who is {}?", p.title))
                    .collect();
                let hops = asks.len();
                let mut model = ScriptedAsks {
                    inner: GeneratorStepModel::new(
                        m.generator.as_ref(),
                        &m.tokenizer,
                        &m.manifest.eos_token_ids,
                    )
                    .with_kv_reuse(reuse),
                    asks,
                    asked: 0,
                };
                let r = reason(&q.question, &index, &mut model, &opts)?;
                // One step per scripted hop the model answered, then the forced answer.
                assert!(r.forced, "{}", q.question);
                assert!(r.steps.len() <= hops + 1, "{}", q.question);
                let init = r.steps.first().map(|s| s.stage);
                assert!(
                    matches!(init, Some(Stage::Init | Stage::Aggregate)),
                    "{init:?}"
                );
                rs.push(r);
            }
            runs.push(rs);
        }
        let (on, off) = same_runs(&runs[0], &runs[1])?;
        let hops: usize = runs[0].iter().map(|r| r.sentences().len()).sum();
        let ratio = 1.0 - on as f64 / off as f64;
        println!(
            "{name}: self-ask with scripted follow-ups, {QUESTIONS} questions, {hops} hops answered by the model: prefilled {on} tokens with reuse, {off} without (reuse ratio {ratio:.3})"
        );
        assert!(hops > 0, "the model answered no sub-question");
        assert!(ratio > MIN_REUSE, "reuse ratio {ratio}");
    }
    Ok(())
}

/// Extra tokens the chat layout may re-prefill per generation: the template's closing markup
/// of the user turn and the assistant header after the question.
const MARKUP_TOKENS: usize = 5;

/// Tokens an asking generation may re-prefill: the newline after the previous answer and the
/// token it may merge with.
const ASK_TOKENS: usize = 2;

fn passage(step: usize, i: usize) -> PromptPassage {
    let words: Vec<String> = (0..60)
        .map(|w| format!("word{}", (step * 131 + i * 17 + w * 7) % 97))
        .collect();
    PromptPassage {
        title: format!("Title {step}-{i}"),
        text: words.join(" "),
    }
}

/// (tokens re-prefilled, prompt tokens) per generation after the first of a four-hop run:
/// ask, retrieve two passages, answer, for each hop; the final answer is forced.
fn reuse(layout: &PromptLayout, tok: &Tokenizer) -> Result<Vec<(usize, usize)>> {
    let enc = |s: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(s, false)
            .map_err(|e| anyhow!("{e}"))?
            .get_ids()
            .to_vec())
    };
    let question = "Which county is the city near the valley in?";
    let fw = Framework::SelfAsk;
    let mut passages = Vec::new();
    let mut hops: Vec<String> = Vec::new();
    let mut cached: Option<Vec<u32>> = None;
    let mut out = Vec::new();
    let mut run = |prompt: String, generated: &str, out: &mut Vec<(usize, usize)>| -> Result<()> {
        let ids = enc(&prompt)?;
        if let Some(prev) = &cached {
            let common = prev.iter().zip(&ids).take_while(|(a, b)| a == b).count();
            out.push((ids.len() - common.min(ids.len() - 1), ids.len()));
        }
        let mut held = ids;
        held.extend(enc(generated)?);
        cached = Some(held);
        Ok(())
    };
    for step in 1..=4 {
        let follow_up = format!("Follow up: Which city is in valley {step}?");
        run(
            layout.render_for(fw, question, &passages, &hops, 100, None)?,
            &follow_up,
            &mut out,
        )?;
        passages.push(passage(step, 0));
        passages.push(passage(step, 1));
        let pending = format!("{follow_up}\nIntermediate answer:");
        let answer = format!(" City {step} is in county {step}.");
        let prompt = layout.render_for(fw, question, &passages, &hops, 100, Some(&pending))?;
        run(prompt, &answer, &mut out)?;
        hops.push(format!("{pending}{answer}"));
    }
    let prompt = layout.render_for(
        fw,
        question,
        &passages,
        &hops,
        100,
        Some("So the final answer is:"),
    )?;
    run(prompt, " County 4.", &mut out)?;
    Ok(out)
}

#[test]
fn self_ask_prompts_re_prefill_only_what_follows_the_passages_held() -> Result<()> {
    let tok = Tokenizer::from_file(steper_test_support::smollm2_tokenizer()?)
        .map_err(|e| anyhow!("{e}"))?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let source = std::fs::read_to_string(fixtures.join("qwen2.5.jinja"))?;
    let chat = PromptLayout::chat(ChatTemplate::new(
        &source,
        fixtures.join("qwen2.5.jinja"),
        BTreeMap::from([("eos_token".to_string(), "<|im_end|>".to_string())]),
    )?);
    let plain = reuse(&PromptLayout::Plain, &tok)?;
    let chatted = reuse(&chat, &tok)?;
    let ratio = |v: &[(usize, usize)]| {
        let (re, all): (usize, usize) = v.iter().fold((0, 0), |(a, b), (r, t)| (a + r, b + t));
        (re, all, 1.0 - re as f64 / all as f64)
    };
    let (pr, pa, pratio) = ratio(&plain);
    let (cr, ca, cratio) = ratio(&chatted);
    println!(
        "self-ask, generations 2-9 of a four-hop run: plain re-prefilled {pr} of {pa} prompt tokens (reuse {pratio:.3}); chat re-prefilled {cr} of {ca} (reuse {cratio:.3}); per generation plain {plain:?} chat {chatted:?}"
    );
    // An asking generation (2, 4, 6; 8 is the forced one) extends the previous answer's
    // prompt and text: only the newline after the answer (and a token it merges with) is new.
    for i in [1, 3, 5] {
        let re = plain[i].0;
        assert!(
            re <= ASK_TOKENS,
            "asking generation {} re-prefills {re} tokens",
            i + 2
        );
    }
    for ((p, _), (c, _)) in plain.iter().zip(&chatted) {
        assert!(
            *c <= p + MARKUP_TOKENS,
            "chat re-prefills {c} tokens where plain re-prefills {p}"
        );
    }
    assert!(pratio > 0.5 && cratio > 0.5, "reuse {pratio} / {cratio}");
    Ok(())
}
