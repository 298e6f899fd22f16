//! The whole chain on a tiny student: synthetic world → BM25 index → gold-teacher distillation →
//! σ-weighted training → ONNX export → evaluation through the runtime Engine (ort and tract).

use anyhow::Result;
use steper_runtime::data::{read_corpus, read_qa, ReadOptions};
use steper_runtime::eval::{evaluate, EvalOptions};
use steper_runtime::retrieval::{build_index, Bm25Index, IndexOptions};
use steper_runtime::LoopOptions;
use steper_runtime::{BackendKind, Engine, OrtOptions};
use steper_train::distill::{distill, DistillOptions, Filter};
use steper_train::fit::records::{examples_from_records, read_records};
use steper_train::fit::{fit, FitConfig};
use steper_train::student::{init_student, StudentSpec};
use steper_train::synth::{generate_world, write_world, SynthConfig};
use steper_train::teacher::GoldTeacher;

fn ensure_ort() -> Result<()> {
    if std::env::var("ORT_DYLIB_PATH").is_err() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new("bash")
            .arg(root.join("scripts/install-ort.sh"))
            .output()?;
        anyhow::ensure!(out.status.success(), "install-ort.sh failed");
        std::env::set_var("ORT_DYLIB_PATH", String::from_utf8(out.stdout)?.trim());
    }
    Ok(())
}

#[test]
fn synth_to_eval_end_to_end() -> Result<()> {
    ensure_ort()?;
    let tmp = tempfile::tempdir()?;
    let d = tmp.path();
    let world = generate_world(&SynthConfig {
        people: 40,
        companies: 12,
        cities: 12,
        countries: 5,
        questions_per_hop: 8,
        ..Default::default()
    });
    write_world(&world, &d.join("world"))?;
    let corpus = read_corpus(&d.join("world/corpus.jsonl"), ReadOptions::default())?.rows;
    build_index(
        &corpus,
        &d.join("index"),
        &d.join("world/corpus.jsonl"),
        IndexOptions::default(),
    )?;
    let index = Bm25Index::open(&d.join("index"))?;

    let texts: Vec<String> = corpus
        .iter()
        .map(|p| format!("Wikipedia Title: {}\n{}", p.title, p.text))
        .collect();
    let spec = StudentSpec {
        vocab_size: 400,
        layers: 2,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        intermediate: 128,
        context: 512,
        seed: 1,
    };
    let cfg = init_student(&texts, &spec, &d.join("student0"))?;
    let tok = steper_models::load_tokenizer(&d.join("student0/tokenizer.json"), cfg.vocab_size)?;

    let train_q = read_qa(&d.join("world/train.jsonl"), ReadOptions::default())?.rows;
    let mut teacher = GoldTeacher::new().with_budget(tok.clone(), cfg.max_position_embeddings);
    let opts = DistillOptions {
        loop_opts: LoopOptions::default(),
        filter: Filter::Em,
        vanilla: true,
        stop_after: None,
    };
    let s = distill(
        &train_q,
        &index,
        &mut teacher,
        |t, q| t.set_example(q),
        &opts,
        &d.join("distill"),
        false,
    )?;
    assert!(s.passed > 0, "gold teacher passed no question: {s:?}");
    assert!(
        s.records.iter().all(|&n| n > 0),
        "a stage has no records: {:?}",
        s.records
    );

    let (records, _) = read_records(&d.join("distill/stepwise.jsonl"), false)?;
    let eos = cfg.eos_ids()[0];
    let ex = examples_from_records(&records, &tok, 100, eos, cfg.max_position_embeddings)?;
    let fc = FitConfig {
        steps: 6,
        batch_size: 4,
        warmup: 2,
        save_every: 3,
        ..Default::default()
    };
    let summary = fit(
        &d.join("student0"),
        &ex,
        &ex[..4.min(ex.len())],
        &fc,
        &d.join("student"),
        false,
    )?;
    assert!(summary.finished);

    steper_export::export(
        &d.join("student"),
        &d.join("onnx"),
        &steper_export::ExportOptions::default(),
    )?;
    let test_q = read_qa(&d.join("world/test.jsonl"), ReadOptions::default())?.rows;
    let mut answers = Vec::new();
    for backend in [BackendKind::Ort(OrtOptions::default()), BackendKind::Tract] {
        let engine = Engine::builder()
            .model_dir(d.join("onnx"))
            .backend(backend)
            .index(d.join("index"))
            .build()?;
        let mut ro = engine.default_options();
        ro.loop_options.max_sentence_tokens = 8;
        ro.loop_options.max_steps = 2;
        let out = d.join("eval.jsonl");
        let (sum, recs) = evaluate(
            &engine,
            &test_q,
            &ro,
            &EvalOptions {
                limit: Some(3),
                progress: false,
            },
            Some(&out),
        )?;
        assert_eq!(sum.questions, 3);
        assert_eq!(sum.errors, 0);
        let lines = std::fs::read_to_string(&out)?;
        assert_eq!(lines.lines().count(), 3);
        for l in lines.lines() {
            let v: serde_json::Value = serde_json::from_str(l)?;
            for key in ["prediction", "em", "f1", "acc"] {
                assert!(v.get(key).is_some(), "eval record lacks {key}: {l}");
            }
        }
        answers.push(
            recs.iter()
                .map(|r| serde_json::to_string(&r.prediction).unwrap_or_default())
                .collect::<Vec<_>>(),
        );
    }
    // Greedy decoding on the same export: ort and tract agree.
    assert_eq!(answers[0], answers[1]);
    Ok(())
}
