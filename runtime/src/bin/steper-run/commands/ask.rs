//! `steper-run ask`: answer one question and show the trace.

use std::path::{Path, PathBuf};

use anyhow::Context;

use steper_runtime::{
    BackendKind, Engine, ExecutionProvider, OrtOptions, Reasoning, TensorRtOptions,
};

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Backend {
    /// ONNX Runtime (CPU execution provider).
    Ort,
    /// tract (pure Rust).
    Tract,
}

impl Backend {
    /// The library's backend value.
    pub fn kind(self, threads: Option<usize>) -> BackendKind {
        match self {
            Backend::Ort => BackendKind::Ort(OrtOptions::default().with_intra_threads(threads)),
            Backend::Tract => BackendKind::Tract,
        }
    }
}

/// How ONNX Runtime keeps the KV cache between calls.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum KvCache {
    /// In place for a GroupQueryAttention export on the CPU provider, else concatenated.
    #[default]
    Auto,
    /// One preallocated buffer per layer bound as past and present (needs --attention gqa).
    InPlace,
    /// Each call's present outputs become the next call's past.
    Concat,
}

impl KvCache {
    /// The library's value.
    pub fn mode(self) -> steper_runtime::KvCacheMode {
        match self {
            KvCache::Auto => steper_runtime::KvCacheMode::Auto,
            KvCache::InPlace => steper_runtime::KvCacheMode::InPlace,
            KvCache::Concat => steper_runtime::KvCacheMode::Concat,
        }
    }
}

/// ONNX Runtime execution provider.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Provider {
    /// CPU.
    Cpu,
    /// CUDA (needs the onnxruntime-gpu library and CUDA 13 / cuDNN 9).
    Cuda,
    /// TensorRT (needs the onnxruntime-gpu library and TensorRT 10).
    Tensorrt,
}

/// Execution-provider flags of the ONNX Runtime backend.
#[derive(clap::Args, Clone, Debug)]
pub struct ProviderArgs {
    /// Execution provider (GPU providers need onnxruntime-gpu in ORT_DYLIB_PATH).
    #[arg(long, value_enum, default_value = "cpu")]
    pub provider: Provider,
    /// CUDA device of the cuda / tensorrt providers.
    #[arg(long, default_value_t = 0)]
    pub device_id: i32,
    /// TensorRT: allow fp16 kernels.
    #[arg(long)]
    pub trt_fp16: bool,
    /// TensorRT: allow int8 kernels (a QDQ model from steper-calibrate, or a float model with
    /// --trt-calibration-table).
    #[arg(long)]
    pub trt_int8: bool,
    /// TensorRT: calibration table written by steper-calibrate: calibration.flatbuffers
    /// (ONNX Runtime's table) or calibration.cache (TensorRT's native cache, see
    /// --trt-native-table).
    #[arg(long, requires = "trt_int8")]
    pub trt_calibration_table: Option<PathBuf>,
    /// TensorRT: read the table as TensorRT's native cache (implied by a .cache extension).
    #[arg(long, requires = "trt_calibration_table")]
    pub trt_native_table: bool,
    /// TensorRT: engine cache directory (default: the calibration table's directory, where
    /// ONNX Runtime looks for the table).
    #[arg(long)]
    pub trt_engine_cache: Option<PathBuf>,
    /// Fall back to the next provider (finally CPU) when one cannot be registered.
    #[arg(long)]
    pub allow_fallback: bool,
}

impl ProviderArgs {
    /// Sets the providers of an ONNX Runtime backend; GPU providers with tract are an error.
    pub fn apply(&self, kind: BackendKind) -> anyhow::Result<BackendKind> {
        let trt_flags = self.trt_fp16 || self.trt_int8 || self.trt_engine_cache.is_some();
        if trt_flags && !matches!(self.provider, Provider::Tensorrt) {
            anyhow::bail!("--trt-* flags need --provider tensorrt");
        }
        let p = match self.provider {
            Provider::Cpu => return Ok(kind),
            Provider::Cuda => ExecutionProvider::Cuda {
                device_id: self.device_id,
            },
            Provider::Tensorrt => ExecutionProvider::TensorRt(
                TensorRtOptions::default()
                    .with_device_id(self.device_id)
                    .with_fp16(self.trt_fp16)
                    .with_int8(self.trt_int8)
                    .with_calibration_table(self.trt_calibration_table.clone())
                    .with_native_calibration_table(self.trt_native_table)
                    .with_engine_cache(self.trt_engine_cache.clone().or_else(|| {
                        self.trt_calibration_table
                            .as_ref()
                            .map(|t| t.parent().map(Path::to_path_buf).unwrap_or_default())
                    })),
            ),
        };
        match kind {
            BackendKind::Ort(mut o) => {
                o.providers = vec![p, ExecutionProvider::Cpu];
                o.allow_fallback = self.allow_fallback;
                Ok(BackendKind::Ort(o))
            }
            _ => anyhow::bail!("--provider needs --backend ort"),
        }
    }
}

/// Model, index and loop flags shared by `ask` and `eval`.
#[derive(clap::Args)]
pub struct EngineArgs {
    /// Export directory (steper.json, model.onnx, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Index directory written by `steper-run index`.
    #[arg(long)]
    pub index: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value = "ort")]
    pub backend: Backend,
    /// ONNX Runtime intra-op threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Execution provider flags.
    #[command(flatten)]
    pub provider: ProviderArgs,
    /// ONNX Runtime: how the KV cache is kept between calls.
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_cache: KvCache,
    /// Prefill every step from scratch instead of reusing the KV cache of the common prefix.
    #[arg(long)]
    pub no_kv_reuse: bool,
    /// Prompt-lookup decoding: draft up to N tokens copied from the prompt after the step's
    /// last 3 (or 2) tokens and verify them in one model call. Greedy output is unchanged;
    /// steps that restate a passage take fewer model calls. Not with `eval --batch` > 1.
    #[arg(long, value_name = "N")]
    pub prompt_lookup: Option<usize>,
    /// Maximum steps (default: the model's manifest).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passages retrieved per step (default: the model's manifest).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Few-shot demonstrations put before every step prompt: an IRCoT prompt file
    /// (`data/ircot_prompts/hotpotqa.txt`), optionally `:N` for its first N.
    #[arg(long, value_name = "FILE[:N]")]
    pub demos: Option<String>,
    /// How the loop reasons: `ircot` (each step states a sentence) or `self-ask` (each step asks
    /// a follow-up question and answers it) (default: the model's manifest, else ircot).
    #[arg(long, value_name = "ircot|self-ask")]
    pub framework: Option<steper_runtime::Framework>,
}

impl EngineArgs {
    /// Loads the engine and the options the flags ask for.
    pub fn engine(&self) -> anyhow::Result<(Engine, steper_runtime::ReasonOptions)> {
        self.engine_for_workers(1)
    }

    /// [`EngineArgs::engine`] for `workers` callers at once: one session each, and (unless
    /// `--threads` says otherwise) the cores split between them.
    pub fn engine_for_workers(
        &self,
        workers: usize,
    ) -> anyhow::Result<(Engine, steper_runtime::ReasonOptions)> {
        // One worker without --threads: ONNX Runtime's own default (one thread per core).
        let threads = match (self.threads, workers) {
            (None, 1) => None,
            (t, w) => Some(super::threads_per_worker(t, w)),
        };
        let kind = self
            .backend
            .kind(threads)
            .with_concurrency(workers)
            .with_kv_cache(self.kv_cache.mode());
        let engine = Engine::builder()
            .model_dir(&self.model)
            .backend(self.provider.apply(kind)?)
            .index(&self.index)
            .build()?;
        super::warn_fallbacks(engine.info());
        let mut opts = engine.default_options();
        opts.kv_reuse = !self.no_kv_reuse;
        if let Some(n) = self.prompt_lookup {
            let pl = steper_runtime::PromptLookup::with_max_draft(n);
            pl.validate()
                .with_context(|| format!("--prompt-lookup {n}"))?;
            opts.prompt_lookup = Some(pl);
        }
        if let Some(n) = self.max_steps {
            opts.loop_options.max_steps = n;
        }
        if let Some(k) = self.top_k {
            opts.loop_options.top_k = k;
        }
        if let Some(fw) = self.framework {
            opts.loop_options = opts.loop_options.with_framework(fw);
        }
        if let Some(spec) = &self.demos {
            anyhow::ensure!(
                opts.loop_options.framework == steper_runtime::Framework::Ircot,
                "--demos {spec}: the demonstrations are IRCoT steps and the loop runs {}; leave out --demos or run --framework ircot",
                opts.loop_options.framework
            );
            let (path, n) = steper_runtime::fewshot::parse_spec(spec);
            let demos = steper_runtime::fewshot::load_ircot(&path, n)
                .with_context(|| format!("--demos {spec}"))?;
            opts.prompt_prefix = Some(steper_runtime::fewshot::prefix(&demos));
        }
        opts.loop_options.validate()?;
        Ok((engine, opts))
    }
}

/// Arguments of `ask`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// Print the answer and trace as JSON.
    #[arg(long)]
    json: bool,
    /// The question.
    question: String,
}

/// Answers the question and prints the trace.
pub fn run(a: Args) -> anyhow::Result<()> {
    let (engine, opts) = a.engine.engine()?;
    let r = engine.reason(&a.question, &opts)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"backend": engine.info(), "reasoning": r})
        );
    } else {
        print_trace(&r);
        let i = engine.info();
        println!("(backend {} on {})", i.backend, i.providers.join(", "));
    }
    Ok(())
}

/// Prints a readable trace: steps, passages, confidence, answer.
pub fn print_trace(r: &Reasoning) {
    println!("Q: {}", r.question);
    for s in &r.steps {
        println!(
            "\nstep {} ({:?}{}){}",
            s.step,
            s.stage,
            if s.forced { ", forced" } else { "" },
            if s.truncated {
                format!(
                    " [prompt cut to fit: {} words, {} passages dropped]",
                    s.words_dropped, s.passages_dropped
                )
            } else {
                String::new()
            }
        );
        if !s.query.is_empty() {
            println!("  query: {}", s.query);
        }
        for p in &s.retrieved {
            println!("  + [{:6.2}] {} ({})", p.score, p.title, p.id);
        }
        println!("  > {}", s.sentence);
        println!(
            "  {} tokens, p̄ {:.3}, H̄ {:.3} nats; prefill {} (+{} reused) {:.1} ms, decode {:.1} ms",
            s.new_tokens,
            s.mean_prob.unwrap_or(f64::NAN),
            s.mean_entropy.unwrap_or(f64::NAN),
            s.prefilled_tokens,
            s.reused_tokens,
            s.prefill_ms,
            s.decode_ms
        );
    }
    println!(
        "\nanswer: {}{}",
        r.answer,
        if r.forced { " (forced)" } else { "" }
    );
}

/// Tells stderr about skipped malformed lines.
pub fn report_skipped(path: &Path, skipped: &[(usize, String)]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!(
        "{}: skipped {} malformed line(s)",
        path.display(),
        skipped.len()
    );
    for (line, msg) in skipped.iter().take(5) {
        eprintln!("  {}:{line}: {msg}", path.display());
    }
}
