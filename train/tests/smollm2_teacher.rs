//! The candle teacher with the real SmolLM2-135M-Instruct (imported from the GGUF that
//! scripts/fetch-smollm2.sh fetches) distils 20
//! HotpotQA dev questions end to end. Its pass rate is low (a 135M model); the test checks that
//! the output is complete and consistent, not that the teacher is good.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use steper_runtime::data::{corpus_from_qa, read_qa, ReadOptions, Stage, StepwiseRecord};
use steper_runtime::retrieval::{build_index, Bm25Index, IndexOptions};
use steper_runtime::LoopOptions;
use steper_train::distill::{distill, passes, DistillOptions, Filter, TraceLine};
use steper_train::teacher::CandleTeacher;

/// Questions distilled.
const QUESTIONS: usize = 20;
/// New tokens per step (bounds the test's CPU time; a step is one sentence).
const MAX_NEW_TOKENS: usize = 32;
/// Loop bounds that keep prompts short (the candle teacher prefills the whole prompt at every
/// step): 2 passages per step, at most 3 steps and 6 passages, 50 words per passage.
const TOP_K: usize = 2;
const MAX_STEPS: usize = 3;
const MAX_PASSAGES: usize = 6;
const WORD_CAP: usize = 50;

#[test]
#[ignore = "slow: the real SmolLM2-135M as the candle teacher on 20 questions"]
fn smollm2_distils_20_hotpotqa_questions() -> Result<()> {
    let gguf = steper_test_support::smollm2_gguf()?;
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("smollm2");
    steper_models::gguf::import_gguf(&gguf, &ckpt)
        .with_context(|| format!("importing {}", gguf.display()))?;

    let data = steper_test_support::data_file("hotpotqa_dev500.jsonl.gz")?;
    let all = read_qa(&data, ReadOptions::default())?.rows;
    let corpus = corpus_from_qa(&all);
    build_index(
        &corpus,
        &tmp.path().join("index"),
        &data,
        IndexOptions::default(),
    )?;
    let index = Bm25Index::open(&tmp.path().join("index"))?;

    let ck = steper_models::Checkpoint::load(&ckpt, DType::F32, &Device::Cpu)?;
    let mut teacher = CandleTeacher::new(ck.model()?, ck.tokenizer()?, "smollm2-135m");
    let opts = DistillOptions {
        loop_opts: LoopOptions::default()
            .with_max_sentence_tokens(MAX_NEW_TOKENS)
            .with_top_k(TOP_K)
            .with_max_steps(MAX_STEPS)
            .with_max_passages(MAX_PASSAGES)
            .with_passage_word_cap(WORD_CAP),
        filter: Filter::Em,
        vanilla: true,
        stop_after: None,
    };
    let out = tmp.path().join("out");
    let qs = &all[..QUESTIONS];
    let s = distill(qs, &index, &mut teacher, |_, _| {}, &opts, &out, false)?;
    eprintln!(
        "SmolLM2 teacher on {QUESTIONS} HotpotQA dev questions: {}",
        serde_json::to_string(&s)?
    );

    assert_eq!(s.questions, QUESTIONS);
    assert_eq!(s.new_questions, QUESTIONS);
    assert!(s.teacher_tokens_per_sec > 0.0);

    let traces: Vec<TraceLine> = std::fs::read_to_string(out.join("traces.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let records: Vec<StepwiseRecord> = std::fs::read_to_string(out.join("stepwise.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let ids: Vec<&str> = traces.iter().map(|t| t.qid.as_str()).collect();
    let want: Vec<&str> = qs.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(ids, want, "one trace per question, in question order");

    let mut by_qid: HashMap<&str, Vec<&StepwiseRecord>> = HashMap::new();
    for r in &records {
        by_qid.entry(r.qid.as_str()).or_default().push(r);
    }
    let mut per_stage = [0usize; 3];
    let mut passed = 0;
    for t in &traces {
        assert!(!t.trace.steps.is_empty() && t.trace.steps.len() <= opts.loop_opts.max_steps);
        assert_eq!(
            t.passed,
            passes(Filter::Em, &t.prediction, &t.answers),
            "{}: passed flag",
            t.qid
        );
        let recs = by_qid.get(t.qid.as_str()).cloned().unwrap_or_default();
        if !t.passed {
            assert!(recs.is_empty(), "{}: records of a failed question", t.qid);
            continue;
        }
        passed += 1;
        assert_eq!(
            recs.len(),
            t.trace.steps.len(),
            "{}: one record per step",
            t.qid
        );
        for (r, step) in recs.iter().zip(&t.trace.steps) {
            assert_eq!(r.stage, step.stage);
            assert_eq!(r.target, step.sentence);
            per_stage[match r.stage {
                Stage::Init => 0,
                Stage::Expand => 1,
                Stage::Aggregate => 2,
            }] += 1;
        }
        let last = recs.last().map(|r| r.target.as_str()).unwrap_or_default();
        assert!(
            passes(
                Filter::Em,
                &steper_runtime::answer::extract_answer(last).unwrap_or_default(),
                &t.answers
            ),
            "{}: aggregate target {last:?} does not state a gold answer {:?}",
            t.qid,
            t.answers
        );
    }
    assert_eq!(passed, s.passed);
    assert_eq!(per_stage, s.records);
    assert_eq!(s.vanilla_records, s.passed);
    Ok(())
}
