//! The loop through the public API on real data: cross-step KV reuse on 20 HotpotQA questions
//! (identical answers with and without reuse, prefilled tokens with reuse ≤ 0.6× without),
//! context overflow, and the same checks on a real exported model when one is given.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result};
use steper_runtime::data::{corpus_from_qa, read_qa, ReadOptions};
use steper_runtime::eval::{evaluate, EvalOptions, EvalRecord};
use steper_runtime::retrieval::{build_index, Bm25Index, IndexOptions};
use steper_runtime::{Engine, Error, Generator, GeneratorInfo, Logits, LogitsMode, Sequence};

/// The bar: prefilled tokens with reuse ≤ 0.6 × without.
const MAX_PREFILL_RATIO: f64 = 0.6;
/// Questions of the reuse comparison.
const QUESTIONS: usize = 20;
/// Logit of the token the fake model picks, over 0 for the rest.
const FAKE_MARGIN: f32 = 4.0;

/// A deterministic fake LM: its cache holds the tokens it was fed, and the next token is a hash
/// of the last cached tokens, so a runtime that keeps a wrong cache produces different text. A
/// sentence ends with `.` then EOS.
struct HashLm {
    info: GeneratorInfo,
    words: Vec<u32>,
    period: u32,
    eos: u32,
}

impl HashLm {
    fn new(tok: &tokenizers::Tokenizer, context_length: usize) -> Result<Self> {
        let id = |s: &str| -> Result<u32> {
            let e = tok.encode(s, false).map_err(|e| anyhow::anyhow!("{e}"))?;
            e.get_ids().first().copied().context("empty encoding")
        };
        Ok(HashLm {
            info: GeneratorInfo::new("hash-lm", tok.get_vocab_size(true), context_length)
                .with_providers(["CPU"]),
            words: [
                " the",
                " city",
                " was",
                " born",
                " in",
                " film",
                " and",
                " American",
            ]
            .iter()
            .map(|w| id(w))
            .collect::<Result<_>>()?,
            period: id(".")?,
            eos: tok
                .token_to_id("<|endoftext|>")
                .context("no <|endoftext|>")?,
        })
    }

    fn next(&self, cache: &[u32]) -> u32 {
        if cache.last() == Some(&self.period) {
            return self.eos;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in &cache[cache.len().saturating_sub(5)..] {
            h = (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3);
        }
        if h.is_multiple_of(6) {
            self.period
        } else {
            self.words[(h / 6) as usize % self.words.len()]
        }
    }
}

fn cache(seq: &mut Sequence) -> steper_runtime::Result<&mut Vec<u32>> {
    seq.cache_mut()
        .downcast_mut::<Vec<u32>>()
        .ok_or(Error::ForeignSequence)
}

impl Generator for HashLm {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }
    fn new_sequence(&self) -> steper_runtime::Result<Sequence> {
        Ok(Sequence::new(Box::new(Vec::<u32>::new())))
    }
    fn append(
        &self,
        seq: &mut Sequence,
        tokens: &[u32],
        _mode: LogitsMode,
    ) -> steper_runtime::Result<Logits> {
        let c = cache(seq)?;
        c.extend_from_slice(tokens);
        if c.len() > self.info.context_length {
            return Err(Error::SequenceTooLong {
                tokens: c.len(),
                context_length: self.info.context_length,
            });
        }
        let mut data = vec![0.0; self.info.vocab_size];
        data[self.next(c) as usize] = FAKE_MARGIN;
        seq.push_tokens(tokens);
        Ok(Logits {
            rows: 1,
            vocab: self.info.vocab_size,
            data,
        })
    }
    fn truncate(&self, seq: &mut Sequence, len: usize) -> steper_runtime::Result<()> {
        cache(seq)?.truncate(len);
        seq.truncate_tokens(len);
        Ok(())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    index: PathBuf,
    qa: Vec<steper_runtime::data::QaExample>,
    tokenizer: tokenizers::Tokenizer,
}

fn fixture() -> Result<Fixture> {
    let path = common::data_file("hotpotqa_dev500.jsonl.gz")?;
    let qa = read_qa(&path, ReadOptions::default())?.rows;
    let dir = tempfile::tempdir()?;
    let index = dir.path().join("index");
    build_index(&corpus_from_qa(&qa), &index, &path, IndexOptions::default())?;
    let tokenizer = tokenizers::Tokenizer::from_file(steper_test_support::smollm2_tokenizer()?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Fixture {
        _dir: dir,
        index,
        qa,
        tokenizer,
    })
}

fn fake_engine(f: &Fixture, context_length: usize) -> Result<Engine> {
    let lm = HashLm::new(&f.tokenizer, context_length)?;
    let eos = [lm.eos];
    Ok(Engine::builder()
        .generator(Arc::new(lm), f.tokenizer.clone(), &eos)
        .retriever(Arc::new(Bm25Index::open(&f.index)?))
        .build()?)
}

fn compare_reuse(engine: &Engine, qa: &[steper_runtime::data::QaExample]) -> Result<()> {
    let opts = EvalOptions {
        limit: Some(QUESTIONS),
        progress: false,
    };
    let on = engine.default_options().with_kv_reuse(true);
    let off = engine.default_options().with_kv_reuse(false);
    let (s_on, r_on) = evaluate(engine, qa, &on, &opts, None)?;
    let (s_off, r_off) = evaluate(engine, qa, &off, &opts, None)?;
    eprintln!("with reuse: {s_on:?}\nwithout: {s_off:?}");
    assert_eq!(s_on.questions, QUESTIONS);
    assert_eq!(
        s_on.errors,
        0,
        "{:?}",
        r_on.iter().find(|r| r.error.is_some())
    );
    for (a, b) in r_on.iter().zip(&r_off) {
        assert_eq!(a.prediction, b.prediction, "question {}", a.id);
        let sa: Vec<&str> = a.trace.iter().map(|s| s.sentence.as_str()).collect();
        let sb: Vec<&str> = b.trace.iter().map(|s| s.sentence.as_str()).collect();
        assert_eq!(sa, sb, "question {}", a.id);
    }
    assert_eq!(s_off.reused_tokens, 0);
    assert_eq!(
        s_on.prefilled_tokens + s_on.reused_tokens,
        s_off.prefilled_tokens,
        "the same prompts either way"
    );
    let ratio = s_on.prefilled_tokens as f64 / s_off.prefilled_tokens as f64;
    eprintln!(
        "prefilled tokens: {} with reuse, {} without (ratio {ratio:.3})",
        s_on.prefilled_tokens, s_off.prefilled_tokens
    );
    assert!(ratio <= MAX_PREFILL_RATIO, "ratio {ratio}");
    Ok(())
}

#[test]
fn kv_reuse_gives_identical_answers_and_saves_prefill_on_20_questions() -> Result<()> {
    let f = fixture()?;
    let engine = fake_engine(&f, 2048)?;
    compare_reuse(&engine, &f.qa)?;
    // Several threads share one engine.
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = f.qa[..4]
            .iter()
            .map(|q| s.spawn(|| engine.reason(&q.question, &engine.default_options())))
            .collect();
        for (h, q) in handles.into_iter().zip(&f.qa) {
            let threaded = h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            let alone = engine.reason(&q.question, &engine.default_options())?;
            assert_eq!(threaded.answer, alone.answer);
            assert_eq!(threaded.sentences(), alone.sentences());
            assert_eq!(threaded.passages, alone.passages);
        }
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_question_longer_than_the_context_is_a_clear_error() -> Result<()> {
    let f = fixture()?;
    let engine = fake_engine(&f, 192)?;
    let long = format!("{} Who?", f.qa[0].question.repeat(12));
    match engine.reason(&long, &engine.default_options()) {
        Err(Error::ContextOverflow { tokens, budget }) => assert!(tokens > budget),
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
    // A short question still fits: passages are cut instead, and the trace says so.
    let r = engine.reason(&f.qa[0].question, &engine.default_options())?;
    assert!(r.steps.iter().any(|s| s.truncated));
    assert!(r.steps.iter().all(|s| s.prompt_tokens + 48 <= 192));
    Ok(())
}

#[test]
fn kv_reuse_with_a_real_exported_model() -> Result<()> {
    let model = common::test_model()?;
    let f = fixture()?;
    for backend in [
        steper_runtime::BackendKind::Ort(steper_runtime::OrtOptions::default()),
        steper_runtime::BackendKind::Tract,
    ] {
        let name = backend.name();
        let engine = Engine::builder()
            .model_dir(&model)
            .backend(backend)
            .index(&f.index)
            .build()
            .with_context(|| format!("loading {} on {name}", model.display()))?;
        eprintln!("backend {name}");
        compare_reuse(&engine, &f.qa)?;
    }
    Ok(())
}

#[test]
fn eval_cli_on_a_real_exported_model_writes_well_formed_records() -> Result<()> {
    let model = common::test_model()?;
    let f = fixture()?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("results.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_steper-run"))
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--index")
        .arg(&f.index)
        .arg("--data")
        .arg(common::data_file("hotpotqa_dev500.jsonl.gz")?)
        .args(["--limit", "20", "--json", "--out"])
        .arg(&out)
        .output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(summary["questions"], 20);
    for key in [
        "em",
        "f1",
        "acc",
        "mean_steps",
        "questions_per_sec",
        "tokens_per_sec",
        "reuse_ratio",
    ] {
        assert!(summary[key].is_number(), "{key} in {summary}");
    }
    let records = steper_runtime::data::read_jsonl::<EvalRecord>(&out, ReadOptions::default())?;
    assert_eq!(records.rows.len(), 20);
    for r in &records.rows {
        assert!(r.error.is_none(), "{:?}", r.error);
        assert!(r.steps >= 1 && r.steps == r.trace.len());
        assert!((0.0..=1.0).contains(&r.f1));
    }
    let mut summary_path = out.into_os_string();
    summary_path.push(".summary.json");
    assert!(Path::new(&summary_path).is_file());
    Ok(())
}
