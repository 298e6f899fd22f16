//! The dataset formats users have, read through the runtime's QA reader: each official-format
//! fixture gives the same questions as the same file written in the project's schema; gzip and
//! Zstandard inputs read the same as plain ones; 250 real HotpotQA questions written in the
//! official layout convert back to the originals; `steper-run data convert` writes what the
//! reader reads.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use steper_runtime::data::{read_qa, read_qa_file, QaExample, QaFormat, ReadOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets")
}

/// `(official file, its format, the same questions in the project's schema, supporting facts
/// the official file has past its paragraphs' sentences)`.
const CASES: [(&str, QaFormat, &str, usize); 5] = [
    (
        "hotpotqa.json",
        QaFormat::HotpotQa,
        "hotpotqa.expected.jsonl",
        1,
    ),
    ("2wiki.json", QaFormat::TwoWiki, "2wiki.expected.jsonl", 1),
    (
        "musique.jsonl",
        QaFormat::Musique,
        "musique.expected.jsonl",
        0,
    ),
    (
        "flashrag.jsonl",
        QaFormat::FlashRag,
        "flashrag.expected.jsonl",
        0,
    ),
    ("ircot.jsonl", QaFormat::Ircot, "ircot.expected.jsonl", 0),
];

fn read_steper(path: &Path) -> Result<Vec<QaExample>> {
    let f = read_qa_file(path, None, ReadOptions::default())?;
    ensure!(
        f.format == QaFormat::Steper,
        "{} read as {}",
        path.display(),
        f.format
    );
    Ok(f.rows)
}

#[test]
fn official_fixtures_read_as_their_project_schema_twins() -> Result<()> {
    for (official, format, expected, skipped) in CASES {
        let path = fixtures().join(official);
        let auto = read_qa_file(&path, None, ReadOptions::default())?;
        ensure!(
            auto.format == format,
            "{official}: detected {}",
            auto.format
        );
        ensure!(
            auto.skipped_supporting == skipped,
            "{official}: {} supporting facts skipped, expected {skipped}",
            auto.skipped_supporting
        );
        let named = read_qa_file(&path, Some(format), ReadOptions::default())?;
        let want = read_steper(&fixtures().join(expected))?;
        ensure!(!want.is_empty(), "{expected} holds no question");
        for (got, want) in auto.rows.iter().zip(&want) {
            assert_eq!(got, want, "{official}: question {}", want.id);
        }
        assert_eq!(auto.rows.len(), want.len(), "{official}");
        assert_eq!(named.rows, auto.rows, "{official}: --from {format}");
        // every place that reads a QA file reads the official one directly
        assert_eq!(
            read_qa(&path, ReadOptions::default())?.rows,
            want,
            "{official}"
        );
    }
    Ok(())
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
}

#[test]
fn gzip_and_zstd_inputs_read_the_same() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (official, format, _, _) in CASES {
        let path = fixtures().join(official);
        let plain = read_qa_file(&path, None, ReadOptions::default())?;
        let bytes = std::fs::read(&path)?;
        for (ext, packed) in [("gz", gzip(&bytes)?), ("zst", zstd(&bytes))] {
            let p = dir.path().join(format!("{official}.{ext}"));
            std::fs::write(&p, packed)?;
            let got = read_qa_file(&p, None, ReadOptions::default())?;
            ensure!(
                got.format == format,
                "{official}.{ext}: read as {}",
                got.format
            );
            assert_eq!(got.rows, plain.rows, "{official}.{ext}");
        }
    }
    Ok(())
}

/// The data file whose first questions carry sentence-level supporting facts.
fn trainpool() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/hotpotqa_trainpool1192.jsonl.gz")
}

/// Writes a project-schema question in HotpotQA's official layout. Supporting facts follow
/// `supporting_titles`' order, so the converter rebuilds the same list.
fn to_hotpot_official(q: &QaExample) -> Result<Value> {
    let mut context = Vec::new();
    for p in &q.paragraphs {
        let Some(sentences) = &p.sentences else {
            bail!("{}: paragraph {:?} has no sentences", q.id, p.title);
        };
        context.push(json!([p.title, sentences]));
    }
    let mut facts = Vec::new();
    for title in q.supporting_titles.iter().flatten() {
        for p in q.paragraphs.iter().filter(|p| &p.title == title) {
            for i in p.supporting_sentences.iter().flatten() {
                facts.push(json!([title, i]));
            }
        }
    }
    Ok(json!({
        "_id": q.id,
        "question": q.question,
        "answer": q.answers.first().context("a question without an answer")?,
        "type": q.kind,
        "context": context,
        "supporting_facts": facts,
    }))
}

#[test]
fn real_hotpotqa_questions_round_trip_through_the_official_layout() -> Result<()> {
    const QUESTIONS: usize = 250;
    let path = trainpool();
    let originals: Vec<QaExample> = read_qa(&path, ReadOptions::default())
        .with_context(|| format!("{} (made by scripts/make-data.sh)", path.display()))?
        .rows
        .into_iter()
        .take(QUESTIONS)
        .collect();
    ensure!(
        originals.len() == QUESTIONS,
        "{} has {} questions",
        path.display(),
        originals.len()
    );
    let official: Vec<Value> = originals
        .iter()
        .map(to_hotpot_official)
        .collect::<Result<_>>()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("hotpot_official.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&official)?)?;

    let back = read_qa_file(&file, None, ReadOptions::default())?;
    ensure!(back.format == QaFormat::HotpotQa, "read as {}", back.format);
    ensure!(
        back.skipped_supporting == 0,
        "{} facts skipped",
        back.skipped_supporting
    );
    assert_eq!(back.rows.len(), QUESTIONS);
    let mut with_facts = 0;
    for (got, orig) in back.rows.iter().zip(&originals) {
        // `source` names the file a sample was taken from: the official layout has no such field
        let mut want = orig.clone();
        want.extra.remove("source");
        assert_eq!(got, &want, "question {}", orig.id);
        with_facts += usize::from(
            got.paragraphs
                .iter()
                .any(|p| p.supporting_sentences.is_some()),
        );
    }
    ensure!(
        with_facts == QUESTIONS,
        "{with_facts} questions carry supporting sentences"
    );
    Ok(())
}

#[test]
fn the_convert_command_writes_what_the_reader_reads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (official, format, expected, skipped) in CASES {
        for out_name in ["out.jsonl", "out.jsonl.gz"] {
            let out = dir.path().join(format!("{official}.{out_name}"));
            let run = Command::new(env!("CARGO_BIN_EXE_steper-run"))
                .args(["data", "convert", "--from", "auto"])
                .arg(fixtures().join(official))
                .arg("--out")
                .arg(&out)
                .arg("--json")
                .output()?;
            ensure!(
                run.status.success(),
                "{official}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
            let summary: Value = serde_json::from_slice(&run.stdout)?;
            let want = read_steper(&fixtures().join(expected))?;
            assert_eq!(summary["format"], json!(format.name()), "{official}");
            assert_eq!(summary["records"], json!(want.len()), "{official}");
            assert_eq!(
                summary["skipped_supporting_facts"],
                json!(skipped),
                "{official}"
            );
            assert_eq!(read_steper(&out)?, want, "{official} -> {out_name}");
        }
    }
    Ok(())
}

#[test]
fn the_convert_command_names_the_record_and_field_of_a_bad_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("musique.jsonl");
    let good = std::fs::read_to_string(fixtures().join("musique.jsonl"))?;
    let mut lines: Vec<&str> = good.lines().collect();
    let broken = lines[1].replace("\"answer\": \"Mississippi River\"", "\"answer\": 3");
    ensure!(broken != lines[1], "the fixture's second answer moved");
    lines[1] = &broken;
    std::fs::write(&bad, lines.join("\n"))?;
    let out = dir.path().join("out.jsonl");
    let run = Command::new(env!("CARGO_BIN_EXE_steper-run"))
        .args(["data", "convert", "--from", "musique"])
        .arg(&bad)
        .arg("--out")
        .arg(&out)
        .output()?;
    ensure!(!run.status.success(), "a bad record was accepted");
    let err = String::from_utf8_lossy(&run.stderr);
    for part in [
        bad.display().to_string(),
        "line 2".into(),
        "field `answer`".into(),
    ] {
        ensure!(err.contains(&part), "the error does not name {part}: {err}");
    }
    ensure!(!out.exists(), "a failed conversion left {}", out.display());
    Ok(())
}
