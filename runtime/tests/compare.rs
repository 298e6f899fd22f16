//! `eval::compare` through the public API on record files, and `steper-run compare` on the same
//! files: known differences, sign tests and intervals; refused inputs name file, line and ids.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{anyhow, Result};
use steper_runtime::data::write_jsonl;
use steper_runtime::eval::compare::{
    compare_files, sign_test_p, CompareOptions, Comparison, Metric, RunFiles,
};
use steper_runtime::eval::EvalRecord;

/// Means of a few values and sign-test p values agree to rounding.
const TOLERANCE: f64 = 1e-12;

fn rec(id: &str, em: bool, f1: f64, acc: bool, steps: usize, forced: bool) -> EvalRecord {
    EvalRecord {
        id: id.into(),
        question: format!("question {id}?"),
        prediction: "p".into(),
        golds: vec!["g".into()],
        em: f64::from(u8::from(em)),
        f1,
        acc: f64::from(u8::from(acc)),
        steps,
        forced,
        new_tokens: 5,
        prefilled_tokens: 10,
        reused_tokens: 0,
        seconds: 0.1,
        error: None,
        trace: Vec::new(),
    }
}

/// Three runs on two datasets, "hotpot" (12 questions) and "musique" (8):
/// - base: nothing exact; F1 0.2 everywhere; 3 steps, forced on every question;
/// - better: exact (F1 1) on hotpot questions 0–9 and musique 0–1, otherwise as base;
///   2 steps, never forced;
/// - mixed: exact on hotpot 0–2 only, but base-like elsewhere, with the file in reverse order
///   (pairing is by id).
struct Fixture {
    _dir: tempfile::TempDir,
    base: [PathBuf; 2],
    better: [PathBuf; 2],
    mixed: [PathBuf; 2],
}

fn write_gz(path: &Path, rows: &[EvalRecord]) -> Result<()> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for r in rows {
        serde_json::to_writer(&mut gz, r)?;
        gz.write_all(b"\n")?;
    }
    std::fs::write(path, gz.finish()?)?;
    Ok(())
}

fn fixture() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let sizes = [("hotpot", 12usize), ("musique", 8)];
    let mut base = Vec::new();
    let mut better = Vec::new();
    let mut mixed = Vec::new();
    for (name, n) in sizes {
        let ids: Vec<String> = (0..n).map(|i| format!("{name}-{i}")).collect();
        let rows_base: Vec<_> = ids
            .iter()
            .map(|id| rec(id, false, 0.2, false, 3, true))
            .collect();
        let hits = if name == "hotpot" { 10 } else { 2 };
        let rows_better: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let hit = i < hits;
                rec(id, hit, if hit { 1.0 } else { 0.2 }, hit, 2, false)
            })
            .collect();
        let rows_mixed: Vec<_> = ids
            .iter()
            .enumerate()
            .rev()
            .map(|(i, id)| {
                let hit = name == "hotpot" && i < 3;
                rec(id, hit, if hit { 1.0 } else { 0.2 }, hit, 3, true)
            })
            .collect();
        let dir = |run: &str| -> Result<PathBuf> {
            let d = dir.path().join(run);
            std::fs::create_dir_all(&d)?;
            Ok(d)
        };
        let p = dir("base")?.join(format!("{name}.jsonl"));
        write_jsonl(&p, &rows_base)?;
        base.push(p);
        let p = dir("better")?.join(format!("{name}.jsonl.gz"));
        write_gz(&p, &rows_better)?;
        better.push(p);
        let p = dir("mixed")?.join(format!("{name}.jsonl"));
        write_jsonl(&p, &rows_mixed)?;
        mixed.push(p);
    }
    let two = |v: Vec<PathBuf>| -> Result<[PathBuf; 2]> {
        v.try_into().map_err(|_| anyhow!("two files per run"))
    };
    Ok(Fixture {
        _dir: dir,
        base: two(base)?,
        better: two(better)?,
        mixed: two(mixed)?,
    })
}

fn run_arg(label: &str, files: &[PathBuf; 2]) -> String {
    format!("{label}={},{}", files[0].display(), files[1].display())
}

fn metric(c: &steper_runtime::eval::compare::Cell, m: Metric) -> Result<f64> {
    Ok(c.metric(m).ok_or_else(|| anyhow!("no {m:?}"))?.difference)
}

#[test]
fn known_differences_per_dataset_and_pooled() -> Result<()> {
    let f = fixture()?;
    let runs = RunFiles::parse_all(&[
        run_arg("base", &f.base),
        run_arg("better", &f.better),
        run_arg("mixed", &f.mixed),
    ])?;
    let opts = CompareOptions {
        resamples: 2_000,
        seed: 11,
        ..CompareOptions::default()
    };
    let c = compare_files(&runs, &opts)?;
    assert_eq!(c.baseline, "base");
    let names: Vec<_> = c
        .datasets
        .iter()
        .map(|d| (d.name.as_str(), d.questions))
        .collect();
    assert_eq!(names, [("hotpot", 12), ("musique", 8)]);
    assert_eq!(c.comparisons.len(), 2);

    let better = &c.comparisons[0];
    assert_eq!(better.run, "better");
    let hotpot = &better.datasets[0];
    // 10 questions right only in `better`, none the other way.
    assert_eq!(
        (
            hotpot.em_sign_test.baseline_only,
            hotpot.em_sign_test.run_only
        ),
        (0, 10)
    );
    assert!((hotpot.em_sign_test.p - 2.0 / 1024.0).abs() < TOLERANCE);
    assert!((metric(hotpot, Metric::Em)? - 10.0 / 12.0).abs() < TOLERANCE);
    assert!((metric(hotpot, Metric::F1)? - 10.0 * 0.8 / 12.0).abs() < TOLERANCE);
    // One step fewer and never forced on every question: degenerate intervals.
    for cell in better.datasets.iter().chain(&better.pooled) {
        let steps = cell
            .metric(Metric::Steps)
            .ok_or_else(|| anyhow!("no steps"))?;
        assert_eq!(
            (steps.difference, steps.low, steps.high),
            (-1.0, -1.0, -1.0)
        );
        let forced = cell
            .metric(Metric::Forced)
            .ok_or_else(|| anyhow!("no forced"))?;
        assert_eq!((forced.baseline, forced.run), (1.0, 0.0));
        assert_eq!((forced.low, forced.high), (-1.0, -1.0));
    }
    let pooled = better
        .pooled
        .as_ref()
        .ok_or_else(|| anyhow!("no pooled cell"))?;
    assert_eq!((pooled.dataset.as_str(), pooled.questions), ("pooled", 20));
    assert_eq!(pooled.em_sign_test.run_only, 12);
    assert!((pooled.em_sign_test.p - sign_test_p(0, 12)).abs() < TOLERANCE);
    let em = pooled.metric(Metric::Em).ok_or_else(|| anyhow!("no EM"))?;
    assert!((em.difference - 12.0 / 20.0).abs() < TOLERANCE);
    assert!(em.low > 0.0 && em.low < em.difference && em.difference < em.high);
    // Stratified: each dataset keeps its size, so the pooled EM difference lies between the
    // datasets' extremes (hotpot at most 12/12 of its share, musique at least 0).
    assert!(em.high <= 1.0 && em.low >= 0.0);

    let mixed = &c.comparisons[1];
    assert_eq!(mixed.datasets[0].em_sign_test.run_only, 3);
    assert_eq!(mixed.datasets[1].em_sign_test.run_only, 0);
    assert_eq!(mixed.datasets[1].em_sign_test.p, 1.0);
    let m = mixed.datasets[1]
        .metric(Metric::Em)
        .ok_or_else(|| anyhow!("no EM"))?;
    assert_eq!((m.difference, m.low, m.high), (0.0, 0.0, 0.0));

    // The same seed gives the same intervals (that another seed moves them is a unit test of
    // `stats`: these few discrete differences leave the percentiles on the same values).
    assert_eq!(compare_files(&runs, &opts)?, c);

    let md = c.to_markdown();
    assert!(md.contains("### better − base"), "{md}");
    assert!(
        md.contains("| hotpot | 12 | EM | 0.0 | 83.3 | +83.3 |"),
        "{md}"
    );
    assert!(md.contains("| hotpot | 0 | 10 | 0.002 |"), "{md}");
    Ok(())
}

/// Writes `rows` as the compact per-question summaries an experiment commits: the id, the
/// prediction and the scores, plus fields of its own (per-step confidence) that a reader ignores.
fn write_compact(path: &Path, rows: &[EvalRecord]) -> Result<()> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for r in rows {
        let line = serde_json::json!({
            "id": r.id, "prediction": r.prediction, "em": r.em, "f1": r.f1, "acc": r.acc,
            "steps": r.steps, "forced": r.forced, "step_p": [0.5, 0.75],
        });
        serde_json::to_writer(&mut gz, &line)?;
        gz.write_all(b"\n")?;
    }
    std::fs::write(path, gz.finish()?)?;
    Ok(())
}

#[test]
fn compact_records_compare_like_full_ones() -> Result<()> {
    let f = fixture()?;
    // The same file names (the datasets are named by them) in folders of their own.
    let compact = |label: &str, files: &[PathBuf; 2]| -> Result<[PathBuf; 2]> {
        let mut out = files.clone();
        for (i, p) in files.iter().enumerate() {
            let rows = steper_runtime::data::read_jsonl::<EvalRecord>(p, Default::default())?.rows;
            let name = p.file_name().ok_or_else(|| anyhow!("no file name"))?;
            let stem = name
                .to_string_lossy()
                .replace(".jsonl.gz", "")
                .replace(".jsonl", "");
            let dir = f._dir.path().join(format!("compact-{label}"));
            std::fs::create_dir_all(&dir)?;
            let q = dir.join(format!("{stem}.jsonl.gz"));
            write_compact(&q, &rows)?;
            out[i] = q;
        }
        Ok(out)
    };
    let opts = CompareOptions {
        resamples: 500,
        seed: 3,
        ..CompareOptions::default()
    };
    let full = compare_files(
        &RunFiles::parse_all(&[run_arg("base", &f.base), run_arg("better", &f.better)])?,
        &opts,
    )?;
    let (base, better) = (compact("base", &f.base)?, compact("better", &f.better)?);
    let small = compare_files(
        &RunFiles::parse_all(&[run_arg("base", &base), run_arg("better", &better)])?,
        &opts,
    )?;
    assert_eq!(small.comparisons, full.comparisons);
    Ok(())
}

fn steper_run(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_steper-run"))
        .args(args)
        .output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn binary_json_is_the_library_comparison() -> Result<()> {
    let f = fixture()?;
    let args = [run_arg("base", &f.base), run_arg("better", &f.better)];
    let o = steper_run(&[
        "compare",
        &args[0],
        &args[1],
        "--datasets",
        "hp,mq",
        "--resamples",
        "500",
        "--seed",
        "5",
        "--json",
    ])?;
    assert!(o.status.success(), "{}", text(&o));
    let expected = compare_files(
        &RunFiles::parse_all(&args)?,
        &CompareOptions {
            resamples: 500,
            seed: 5,
            datasets: vec!["hp".into(), "mq".into()],
            ..CompareOptions::default()
        },
    )?;
    assert_eq!(
        String::from_utf8(o.stdout.clone())?.trim_end(),
        serde_json::to_string(&expected)?
    );
    let back: Comparison = serde_json::from_slice(&o.stdout)?;
    assert_eq!(back.comparisons[0].datasets[1].dataset, "mq");

    let o = steper_run(&["compare", &args[0], &args[1], "--resamples", "200"])?;
    assert!(o.status.success(), "{}", text(&o));
    let md = String::from_utf8(o.stdout)?;
    assert!(
        md.contains("| dataset | questions | metric | base | better |"),
        "{md}"
    );
    assert!(md.contains("| pooled | 20 | EM |"), "{md}");
    Ok(())
}

#[test]
fn binary_refuses_other_questions_and_bad_lines() -> Result<()> {
    let f = fixture()?;
    let dir = tempfile::tempdir()?;
    // Drop two questions from a copy of the baseline's musique file.
    let text_in = std::fs::read_to_string(&f.base[1])?;
    let short = dir.path().join("short.jsonl");
    let kept: Vec<&str> = text_in.lines().skip(2).collect();
    std::fs::write(&short, kept.join("\n") + "\n")?;
    let base = run_arg("base", &f.base);
    let other = format!("short={},{}", f.base[0].display(), short.display());
    let o = steper_run(&["compare", &base, &other])?;
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains(&short.display().to_string()), "{msg}");
    assert!(
        msg.contains("2 of the baseline's missing (musique-0, musique-1)"),
        "{msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");

    // A record without its `em` field: the file, the line and the field.
    let broken = dir.path().join("broken.jsonl");
    let mut lines: Vec<String> = text_in.lines().map(str::to_string).collect();
    lines[3] = lines[3].replace("\"em\":0.0,", "");
    std::fs::write(&broken, lines.join("\n") + "\n")?;
    let other = format!("broken={},{}", f.base[0].display(), broken.display());
    let o = steper_run(&["compare", &base, &other])?;
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains(&format!("{}:4:", broken.display())) && msg.contains("`em`"),
        "{msg}"
    );

    // A run with fewer files than the baseline.
    let o = steper_run(&["compare", &base, &f.better[0].display().to_string()])?;
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains("2 record file(s)"), "{msg}");
    Ok(())
}
