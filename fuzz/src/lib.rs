//! Fuzz targets: one per kind of input the tools read, each feeding arbitrary bytes to the
//! public parsing function a tool calls on a user's file or a client's request body.
//!
//! A target returns normally whatever the bytes are: the parsers under test must answer bad input
//! with their crate's error, never a panic. The libFuzzer binary (`libfuzzer/`, run by
//! `scripts/fuzz.sh`) calls [`Harness::run`] under coverage instrumentation; the `corpus` test
//! feeds every saved input under `corpus/<target>/` to the same function on the normal build.

mod fixture;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use steper_runtime::data::{self, ReadOptions, StepwiseRecord};
use steper_runtime::serve::{ChatRequest, CompletionRequest, ReasonRequest};

pub use fixture::Fixture;

/// The kinds of input fuzzed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A QA file in any format the runtime reads (JSONL or a JSON array; plain, gzip, zstd).
    Qa,
    /// A corpus JSONL (`{"id","title","text"}` per line, unique ids).
    Corpus,
    /// Step-wise training records (JSONL).
    Stepwise,
    /// An export's `steper.json`.
    Manifest,
    /// An export's `genai_config.json`, as calibration rewrites it for the int8 export.
    GenaiConfig,
    /// A GGUF file: header, metadata, tensor table, config, tokenizer and weights.
    Gguf,
    /// A checkpoint's `config.json`.
    CheckpointConfig,
    /// A checkpoint's `model.safetensors` (beside a valid `config.json`).
    Safetensors,
    /// A checkpoint's `model.safetensors.index.json` (beside valid shards).
    SafetensorsIndex,
    /// A `tokenizer.json`.
    Tokenizer,
    /// An export's `model.onnx` loaded on the tract backend (beside a valid `steper.json`).
    OnnxTract,
    /// A TensorRT calibration cache.
    TrtCache,
    /// ONNX Runtime's TensorRT calibration table (flatbuffers).
    OrtTable,
    /// The trainer's `train_log.jsonl`, as `steper-train plot` reads it.
    TrainLog,
    /// A `POST /v1/reason` body.
    ReasonRequest,
    /// A `POST /v1/completions` body.
    CompletionRequest,
    /// A `POST /v1/chat/completions` body.
    ChatRequest,
}

impl Target {
    /// Every target, in campaign order.
    pub const ALL: [Target; 17] = [
        Target::Qa,
        Target::Corpus,
        Target::Stepwise,
        Target::Manifest,
        Target::GenaiConfig,
        Target::Gguf,
        Target::CheckpointConfig,
        Target::Safetensors,
        Target::SafetensorsIndex,
        Target::Tokenizer,
        Target::OnnxTract,
        Target::TrtCache,
        Target::OrtTable,
        Target::TrainLog,
        Target::ReasonRequest,
        Target::CompletionRequest,
        Target::ChatRequest,
    ];

    /// The target's name: its corpus folder and its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Qa => "qa",
            Target::Corpus => "corpus",
            Target::Stepwise => "stepwise",
            Target::Manifest => "manifest",
            Target::GenaiConfig => "genai_config",
            Target::Gguf => "gguf",
            Target::CheckpointConfig => "checkpoint_config",
            Target::Safetensors => "safetensors",
            Target::SafetensorsIndex => "safetensors_index",
            Target::Tokenizer => "tokenizer",
            Target::OnnxTract => "onnx_tract",
            Target::TrtCache => "trt_cache",
            Target::OrtTable => "ort_table",
            Target::TrainLog => "train_log",
            Target::ReasonRequest => "reason_request",
            Target::CompletionRequest => "completion_request",
            Target::ChatRequest => "chat_request",
        }
    }

    /// The target called `name`.
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the target needs the [`Fixture`] (a tiny checkpoint and its export).
    fn needs_fixture(self) -> bool {
        matches!(
            self,
            Target::Safetensors | Target::SafetensorsIndex | Target::OnnxTract
        )
    }
}

/// Largest vocabulary a fuzzed `tokenizer.json` may have (the check of
/// [`steper_models::load_tokenizer`] is exercised on both sides of it).
const TOKENIZER_VOCAB_LIMIT: usize = 1 << 16;

/// Runs targets on inputs written into a scratch folder.
pub struct Harness {
    dir: PathBuf,
    fixture: OnceLock<Result<Fixture, String>>,
}

impl Harness {
    /// A harness writing its inputs (and, on first need, the [`Fixture`]) under `dir`.
    pub fn new(dir: &Path) -> std::io::Result<Harness> {
        std::fs::create_dir_all(dir)?;
        Ok(Harness {
            dir: dir.to_path_buf(),
            fixture: OnceLock::new(),
        })
    }

    /// The fixture the checkpoint and ONNX targets load their input beside, made on first use.
    pub fn fixture(&self) -> Result<&Fixture, String> {
        self.fixture
            .get_or_init(|| Fixture::make(&self.dir.join("fixture")).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| e.clone())
    }

    /// Feeds `data` to `target`'s parser; `Err` only when the harness itself cannot run (its
    /// scratch files cannot be written, or the fixture cannot be made). What the parser
    /// returns — success or its error — is the parser's business; a panic propagates.
    pub fn run(&self, target: Target, data: &[u8]) -> Result<(), String> {
        if target.needs_fixture() {
            self.fixture()?;
        }
        let input = |name: &str| -> Result<PathBuf, String> {
            let p = self.dir.join(name);
            std::fs::write(&p, data).map_err(|e| format!("writing {}: {e}", p.display()))?;
            Ok(p)
        };
        let text = || String::from_utf8_lossy(data);
        match target {
            Target::Qa => {
                let p = input("qa.jsonl")?;
                for skip_bad in [false, true] {
                    if let Ok(f) = data::read_qa_file(&p, None, ReadOptions { skip_bad }) {
                        for q in &f.rows {
                            let _ = q.gold_titles();
                            for para in &q.paragraphs {
                                let _ = para.supporting_facts();
                            }
                        }
                        let _ = data::corpus_from_qa(&f.rows);
                    }
                }
            }
            Target::Corpus => {
                let p = input("corpus.jsonl")?;
                let _ = data::read_corpus(&p, ReadOptions::default());
                let _ = data::read_corpus(&p, ReadOptions { skip_bad: true });
            }
            Target::Stepwise => {
                let p = input("stepwise.jsonl")?;
                let _ = data::read_jsonl::<StepwiseRecord>(&p, ReadOptions { skip_bad: true });
            }
            Target::Manifest => {
                let p = input("steper.json")?;
                let _ = steper_runtime::Manifest::load(&p);
            }
            Target::GenaiConfig => {
                let _ = steper_calibration::genai::int8_genai_config(
                    &text(),
                    Path::new("genai_config.json"),
                    "model.int8.onnx",
                );
            }
            Target::Gguf => {
                let p = input("model.gguf")?;
                if let Ok(mut g) = steper_models::gguf::GgufFile::open(&p) {
                    let _ = g.architecture();
                    let _ = g.family();
                    let _ = g.type_counts();
                    let _ = g.tokenizer();
                    if let Ok(cfg) = g.llama_config() {
                        let _ = g.hf_weights(&cfg);
                    }
                }
            }
            Target::CheckpointConfig => {
                let p = Path::new("config.json");
                if let Ok(cfg) = steper_models::LlamaConfig::from_json_str(&text(), p) {
                    let _ = cfg.validate(p);
                }
            }
            Target::Safetensors => {
                let dir = self.checkpoint_dir("safetensors")?;
                std::fs::write(dir.join("model.safetensors"), data)
                    .map_err(|e| format!("writing into {}: {e}", dir.display()))?;
                let _ = steper_models::Checkpoint::load(&dir, DType::F32, &Device::Cpu);
            }
            Target::SafetensorsIndex => {
                let fx = self.fixture()?;
                let dir = self.checkpoint_dir("index")?;
                for shard in &fx.shards {
                    let name = shard.file_name().unwrap_or_default();
                    std::fs::copy(shard, dir.join(name))
                        .map_err(|e| format!("copying {}: {e}", shard.display()))?;
                }
                std::fs::write(dir.join("model.safetensors.index.json"), data)
                    .map_err(|e| format!("writing into {}: {e}", dir.display()))?;
                let _ = steper_models::Checkpoint::load(&dir, DType::F32, &Device::Cpu);
            }
            Target::Tokenizer => {
                let p = input("tokenizer.json")?;
                if let Ok(tok) = steper_models::load_tokenizer(&p, TOKENIZER_VOCAB_LIMIT) {
                    let _ = tok.encode("Wikipedia Title: Fuzz\nthe text", true);
                }
            }
            Target::OnnxTract => {
                let fx = self.fixture()?;
                let p = input("model.onnx")?;
                let _ = steper_runtime::backend::TractGenerator::load(&p, &fx.manifest);
            }
            Target::TrtCache => {
                let _ = steper_calibration::tables::parse_trt_cache(&text(), "calibration.cache");
            }
            Target::OrtTable => {
                let _ =
                    steper_calibration::tables::read_ort_trt_table(data, "calibration.flatbuffers");
            }
            Target::TrainLog => {
                let p = input("train_log.jsonl")?;
                let _ = steper_train::plot::read_log(&p);
            }
            Target::ReasonRequest => {
                let _ = ReasonRequest::parse(data);
            }
            Target::CompletionRequest => {
                let _ = CompletionRequest::parse(data);
            }
            Target::ChatRequest => {
                let _ = ChatRequest::parse(data);
            }
        }
        Ok(())
    }

    /// A checkpoint folder `name` holding only the fixture's `config.json`.
    fn checkpoint_dir(&self, name: &str) -> Result<PathBuf, String> {
        let fx = self.fixture()?;
        let dir = self.dir.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("clearing {}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        std::fs::copy(fx.checkpoint.join("config.json"), dir.join("config.json"))
            .map_err(|e| format!("copying config.json into {}: {e}", dir.display()))?;
        Ok(dir)
    }
}
