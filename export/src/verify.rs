//! `--verify`: the export run on ONNX Runtime and tract against the candle model.
//!
//! The prompt is prefilled, then `steps` decode steps follow the candle model's greedy tokens
//! (every backend is fed the same tokens, so the differences of each step are comparable). Per
//! backend and step the report gives the largest absolute logit difference, the relative one
//! (divided by the largest reference logit magnitude) and whether the backend's argmax is the
//! reference's; when every step agrees, greedy generation is identical.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use steper_runtime::backend::{load_model, BackendKind, OrtOptions};
use steper_runtime::LogitsMode;

use crate::error::{Error, Result};
use crate::ExportDtype;

/// A named logit tolerance.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    /// Name quoted in reports.
    pub name: &'static str,
    /// Largest accepted `max |export − candle| / max |candle|` of a step.
    pub max_rel: f32,
    /// Whether every greedy token must agree.
    pub greedy_exact: bool,
}

/// fp32 export against the fp32 candle model: summation order only.
pub const FP32_CLOSE: Tolerance = Tolerance {
    name: "fp32-close (rel 1e-4, greedy exact)",
    max_rel: 1e-4,
    greedy_exact: true,
};

/// fp16 export against the fp32 candle model: fp16 weights and matmuls.
pub const FP16_APPROX: Tolerance = Tolerance {
    name: "fp16-approx (rel 3e-2, greedy exact)",
    max_rel: 3e-2,
    greedy_exact: true,
};

/// Options of [`verify`].
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Decode steps after the prompt.
    pub steps: usize,
    /// Prompt text (tokenized with the checkpoint's tokenizer); `None`: a default.
    pub prompt: Option<String>,
    /// Run tract too.
    pub tract: bool,
    /// ONNX Runtime options.
    pub ort: OrtOptions,
    /// The tolerance applied.
    pub tolerance: Tolerance,
}

impl VerifyOptions {
    /// Defaults for an export of `dtype`: 32 steps, both backends, the dtype's tolerance.
    pub fn for_dtype(dtype: ExportDtype) -> Self {
        VerifyOptions {
            steps: 32,
            prompt: None,
            tract: true,
            ort: OrtOptions::default(),
            tolerance: match dtype {
                ExportDtype::Fp32 => FP32_CLOSE,
                ExportDtype::Fp16 => FP16_APPROX,
            },
        }
    }
}

/// Differences of one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepDiff {
    /// 0 = prefill (all prompt positions), then decode steps.
    pub step: usize,
    /// Largest absolute logit difference.
    pub max_abs: f32,
    /// `max_abs / max |reference|`.
    pub max_rel: f32,
    /// The backend's argmax equals the reference's (last position).
    pub greedy_agrees: bool,
}

/// One backend's result.
#[derive(Debug, Clone, Serialize)]
pub struct BackendReport {
    /// `ort` or `tract`.
    pub backend: String,
    /// Execution providers actually used.
    pub providers: Vec<String>,
    /// Per step.
    pub steps: Vec<StepDiff>,
    /// Largest `max_abs` over steps.
    pub max_abs: f32,
    /// Largest `max_rel` over steps.
    pub max_rel: f32,
    /// Tokens the backend's own argmax chose.
    pub greedy_tokens: Vec<u32>,
    /// Every step's argmax agrees.
    pub greedy_identical: bool,
    /// Within the tolerance.
    pub pass: bool,
}

/// The `--verify` report.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Prompt token ids.
    pub prompt_tokens: Vec<u32>,
    /// The candle model's greedy tokens.
    pub reference_tokens: Vec<u32>,
    /// The tolerance applied.
    pub tolerance: Tolerance,
    /// Per backend.
    pub backends: Vec<BackendReport>,
    /// All backends pass.
    pub pass: bool,
}

/// Default verification prompt.
pub const DEFAULT_PROMPT: &str = "Wikipedia Title: Paris\nParis is the capital and largest city of France.\n\nQ: Which country is Paris the capital of?\nA:";

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn diff(a: &[f32], r: &[f32]) -> (f32, f32) {
    let mut m = 0f32;
    let mut scale = 0f32;
    for (x, y) in a.iter().zip(r) {
        m = m.max((x - y).abs());
        scale = scale.max(y.abs());
    }
    (m, m / scale.max(1e-12))
}

/// The candle reference: prefill logits of every prompt position, then greedy decode logits.
pub struct Reference {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Logits per step: step 0 has one row per prompt token.
    pub logits: Vec<Vec<f32>>,
    /// Greedy tokens (argmax of each step's last row).
    pub tokens: Vec<u32>,
}

/// Runs the candle model on `prompt` and `steps` greedy tokens.
pub fn reference(model: &steper_models::Llama, prompt: &[u32], steps: usize) -> Result<Reference> {
    let terr = |e: candle_core::Error| Error::Tensor {
        name: "logits".into(),
        message: e.to_string(),
    };
    let mut cache = model.new_cache(1);
    let ids = Tensor::new(prompt, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .map_err(terr)?;
    let lg = model.forward_cached(&ids, None, &mut cache)?;
    let lg: Vec<f32> = lg
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(terr)?;
    let vocab = model.config().vocab_size;
    let mut tokens = vec![argmax(&lg[lg.len() - vocab..])];
    let mut logits = vec![lg];
    for _ in 0..steps {
        let last = *tokens.last().unwrap_or(&0);
        let ids = Tensor::new(&[[last]], &Device::Cpu).map_err(terr)?;
        let lg = model.forward_cached(&ids, None, &mut cache)?;
        let lg: Vec<f32> = lg
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(terr)?;
        tokens.push(argmax(&lg));
        logits.push(lg);
    }
    tokens.pop();
    Ok(Reference {
        prompt: prompt.to_vec(),
        logits,
        tokens,
    })
}

/// Runs the export in `out` on `backend` along the reference's tokens.
pub fn check_backend(
    out: &Path,
    backend: &BackendKind,
    r: &Reference,
    tol: Tolerance,
) -> Result<BackendReport> {
    let m = load_model(out, backend)?;
    let g = m.generator;
    let mut seq = g.new_sequence()?;
    let mut steps = Vec::new();
    let mut own = Vec::new();
    for (i, want) in r.logits.iter().enumerate() {
        let got = if i == 0 {
            g.append(&mut seq, &r.prompt, LogitsMode::All)?
        } else {
            g.append(&mut seq, &[r.tokens[i - 1]], LogitsMode::All)?
        };
        let (max_abs, max_rel) = diff(&got.data, want);
        let vocab = got.vocab;
        let t = argmax(got.last());
        let rt = argmax(&want[want.len() - vocab..]);
        if i < r.tokens.len() {
            own.push(t);
        }
        steps.push(StepDiff {
            step: i,
            max_abs,
            max_rel,
            greedy_agrees: t == rt,
        });
    }
    let max_abs = steps.iter().map(|s| s.max_abs).fold(0f32, f32::max);
    let max_rel = steps.iter().map(|s| s.max_rel).fold(0f32, f32::max);
    let greedy_identical = steps.iter().all(|s| s.greedy_agrees);
    let pass =
        max_rel <= tol.max_rel && (greedy_identical || !tol.greedy_exact) && max_abs.is_finite();
    Ok(BackendReport {
        backend: backend.name().into(),
        providers: g.info().providers.clone(),
        steps,
        max_abs,
        max_rel,
        greedy_tokens: own,
        greedy_identical,
        pass,
    })
}

/// Verifies the export in `out` of `checkpoint` on ONNX Runtime (and tract when asked).
pub fn verify(checkpoint: &Path, out: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    let ck = steper_models::Checkpoint::load(checkpoint, DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let vocab = ck.config.vocab_size;
    let text = opts
        .prompt
        .clone()
        .unwrap_or_else(|| DEFAULT_PROMPT.to_string());
    let prompt: Vec<u32> = match ck.tokenizer() {
        Ok(tok) => {
            let enc = tok
                .encode(text.as_str(), true)
                .map_err(|e| Error::Unsupported(format!("tokenizer: {e}")))?;
            let mut ids = enc.get_ids().to_vec();
            if let (Some(bos), Some(&first)) = (ck.config.bos_token_id, ids.first()) {
                if first != bos && ck.config.bos_token_id.is_some() && ids.len() < 2 {
                    ids.insert(0, bos);
                }
            }
            ids
        }
        // No tokenizer: a fixed pseudo-random prompt.
        Err(_) => (0..24u32).map(|i| (i * 7919 + 13) % vocab as u32).collect(),
    };
    if prompt.is_empty() {
        return Err(Error::Unsupported(
            "the verification prompt tokenizes to nothing".into(),
        ));
    }
    let r = reference(&model, &prompt, opts.steps)?;
    let mut backends = vec![check_backend(
        out,
        &BackendKind::Ort(opts.ort.clone()),
        &r,
        opts.tolerance,
    )?];
    if opts.tract {
        backends.push(check_backend(out, &BackendKind::Tract, &r, opts.tolerance)?);
    }
    let pass = backends.iter().all(|b| b.pass);
    Ok(VerifyReport {
        prompt_tokens: prompt,
        reference_tokens: r.tokens,
        tolerance: opts.tolerance,
        backends,
        pass,
    })
}
