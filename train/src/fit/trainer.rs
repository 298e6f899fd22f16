//! The training loop: batching, accumulation, clipping, schedule, evaluation, checkpoints and
//! exact resume.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use steper_fsutil::{write_atomic, StagingDir};
use steper_models::dtype::device_name;
use steper_models::lora::{init_adapters, merge};
use steper_models::{Checkpoint, Llama, LlamaConfig, Weights};

use super::forward::{batch_losses, make_batch, Prefix};
use super::loss::combine;
use super::optim::{clip_global_norm, lr_at, AdamW};
use super::precision::{training_dtype, HalfModel, LossScaler};
use super::prefix_cache::PrefixCache;
use super::report::EvalLosses;
use super::{Example, FitConfig, FitSummary, LogLine, LossMode, Stage, Trainable};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    optimizer_t: u64,
    log_sigma: [f32; 3],
    config: FitConfig,
    num_examples: usize,
    /// The device the run trained on up to this step (`cpu`, `cuda:0`).
    #[serde(default)]
    device: Option<String>,
    /// The dtype its forward and backward computed in.
    #[serde(default)]
    compute_dtype: Option<String>,
    /// `f16` training: the loss scaler, continued by a resumed run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scaler: Option<LossScaler>,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIM_FILE: &str = "optimizer.safetensors";
const LOG_FILE: &str = "train_log.jsonl";
const CKPT_DIR: &str = "checkpoints";
const LORA_FILE: &str = "lora.safetensors";

fn trainable_name(cfg: &LlamaConfig, t: &Trainable, name: &str) -> bool {
    if name == "model.embed_tokens.weight" {
        return !t.freeze_embeddings;
    }
    if name == "lm_head.weight" {
        return true;
    }
    if let Some(n) = t.top_layers {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let layer: usize = rest
                .split('.')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return layer + n >= cfg.num_hidden_layers;
        }
    }
    true
}

/// Micro-batch `i` of the infinite, deterministic stream of length-bucketed batches.
struct BatchStream {
    n: usize,
    batch: usize,
    bucket: usize,
    seed: u64,
    lens: Vec<usize>,
    epoch: Option<(u64, Vec<Vec<usize>>)>,
}

impl BatchStream {
    fn batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch)
    }

    fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut idx: Vec<usize> = (0..self.n).collect();
        idx.shuffle(&mut rng);
        let mut out = Vec::new();
        for chunk in idx.chunks(self.batch * self.bucket.max(1)) {
            let mut c = chunk.to_vec();
            c.sort_by_key(|&i| (self.lens[i], i));
            let mut bs: Vec<Vec<usize>> = c.chunks(self.batch).map(|b| b.to_vec()).collect();
            bs.shuffle(&mut rng);
            out.extend(bs);
        }
        out
    }

    fn get(&mut self, i: u64) -> Vec<usize> {
        let per = self.batches_per_epoch() as u64;
        let epoch = i / per;
        if self.epoch.as_ref().map(|e| e.0) != Some(epoch) {
            self.epoch = Some((epoch, self.epoch_batches(epoch)));
        }
        let (_, bs) = self.epoch.as_ref().expect("epoch just set");
        bs[(i % per) as usize].clone()
    }
}

fn check_examples(examples: &[Example], cfg: &LlamaConfig, what: &str) -> Result<()> {
    for (i, e) in examples.iter().enumerate() {
        if e.prompt.is_empty() || e.target.is_empty() {
            return Err(Error::Input(format!(
                "{what} example {i}: empty prompt or target"
            )));
        }
        if e.input_len() > cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "{what} example {i}: {} tokens exceed the student's context of {} (max_position_embeddings)",
                e.input_len() + 1,
                cfg.max_position_embeddings
            )));
        }
        if let Some(&bad) = e
            .prompt
            .iter()
            .chain(&e.target)
            .find(|&&t| t as usize >= cfg.vocab_size)
        {
            return Err(Error::Input(format!(
                "{what} example {i}: token id {bad} outside the student's vocabulary ({})",
                cfg.vocab_size
            )));
        }
    }
    Ok(())
}

/// Mean per-stage token losses over `examples` (no gradients).
fn evaluate(
    model: &Llama,
    examples: &[Example],
    batch: usize,
    prefix: &mut Prefix<'_>,
) -> Result<EvalLosses> {
    let dev = model.device().clone();
    let mut sums = [0f64; 3];
    let mut counts = [0usize; 3];
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = make_batch(&refs, &dev)?;
        let sl = batch_losses(model, &refs, &b, prefix)?;
        for j in 0..3 {
            if let Some(l) = &sl.losses[j] {
                sums[j] += l.to_scalar::<f32>()? as f64 * b.counts[j] as f64;
                counts[j] += b.counts[j];
            }
        }
    }
    let m = |j: usize| (counts[j] > 0).then(|| sums[j] / counts[j] as f64);
    Ok(EvalLosses {
        l_init: m(0),
        l_exp: m(1),
        l_agg: m(2),
    })
}

/// Bottom layers that are constant together with the embeddings (they can run, or be cached,
/// without gradients): `num_layers - top_layers` when the embeddings are frozen, else 0.
fn frozen_prefix_layers(cfg: &LlamaConfig, t: &Trainable) -> usize {
    match (t.freeze_embeddings || t.lora.is_some(), t.top_layers) {
        (true, Some(n)) => cfg.num_hidden_layers.saturating_sub(n),
        _ => 0,
    }
}

fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let dir = out.join(CKPT_DIR);
    // A run killed while it staged a checkpoint or removed an old one leaves a temporary that
    // the next checkpoint save would sweep; a resumed run that saves none (it was killed after
    // its last checkpoint) must sweep it here.
    steper_fsutil::remove_stale_temporaries_in(&dir);
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join(STATE_FILE).is_file() && best.as_ref().map(|b| n > b.0).unwrap_or(true)
            {
                best = Some((n, e.path()));
            }
        }
    }
    best.map(|b| b.1)
}

/// Trains the student in `student_dir` on `train` examples, evaluating on `eval`, writing into
/// `out` (final checkpoint at the top level; `checkpoints/step-N/` along the way;
/// `train_log.jsonl`). If `out` holds a checkpoint of an earlier run of the same data and
/// settings, training resumes from its step with the same optimizer state, σ and data order.
pub fn fit(
    student_dir: &Path,
    train: &[Example],
    eval: &[Example],
    cfg: &FitConfig,
    out: &Path,
    progress: bool,
) -> Result<FitSummary> {
    if train.is_empty() {
        return Err(Error::Input("no training examples".into()));
    }
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.steps == 0 {
        return Err(Error::Input(
            "batch_size, grad_accum and steps must be positive".into(),
        ));
    }
    let dev = cfg.device.open()?;
    std::fs::create_dir_all(out).map_err(|e| Error::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    let resume_dir = latest_checkpoint(out);
    let source = resume_dir
        .clone()
        .unwrap_or_else(|| student_dir.to_path_buf());
    // Training never changes the tokenizer: every checkpoint takes it from the student, so a
    // run resumed from a checkpoint that lacks one (written by an older build) still ends with it.
    let tokenizer_from = if student_dir
        .join(steper_models::weights::TOKENIZER_FILE)
        .is_file()
    {
        student_dir.to_path_buf()
    } else {
        source.clone()
    };
    // A LoRA run's checkpoints hold merged weights: it resumes from the student's base weights
    // and the saved adapters.
    let base_dir = if cfg.trainable.lora.is_some() {
        student_dir
    } else {
        source.as_path()
    };
    // Master weights are f32 (the forward and backward compute in `compute`); the checkpoints
    // go back to the student's stored dtype.
    let compute = training_dtype(cfg.dtype, &dev)?;
    let ck = Checkpoint::load(base_dir, DType::F32, &dev)?;
    let stored_dtype = ck.stored_dtype;
    let mcfg = ck.config.clone();
    check_examples(train, &mcfg, "training")?;
    check_examples(eval, &mcfg, "held-out")?;

    let state: Option<TrainerState> = match &resume_dir {
        Some(d) => {
            let p = d.join(STATE_FILE);
            let text = std::fs::read_to_string(&p).map_err(|e| Error::Io {
                path: p.clone(),
                source: e,
            })?;
            let s: TrainerState = serde_json::from_str(&text)
                .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
            if s.num_examples != train.len()
                || s.config.seed != cfg.seed
                || s.config.batch_size != cfg.batch_size
                || s.config.grad_accum != cfg.grad_accum
                || s.config.mode != cfg.mode
                || s.config.trainable.lora != cfg.trainable.lora
            {
                return Err(Error::Input(format!(
                    "{} holds a run with other data or settings (examples {}, seed {}, batch {}x{}, mode {:?}); use a new --out",
                    out.display(), s.num_examples, s.config.seed, s.config.batch_size, s.config.grad_accum, s.config.mode
                )));
            }
            Some(s)
        }
        None => None,
    };

    // Trainable weights become vars; the rest stay constant tensors (no gradient work).
    let mixed = compute != DType::F32;
    let (all, model, vars, adapters, half) = match &cfg.trainable.lora {
        None => {
            let mut frozen = BTreeMap::new();
            let mut to_train = BTreeMap::new();
            for (k, t) in ck.weights.tensors() {
                if trainable_name(&mcfg, &cfg.trainable, k)
                    && !(mcfg.tie_word_embeddings
                        && k == "model.embed_tokens.weight"
                        && cfg.trainable.freeze_embeddings)
                {
                    to_train.insert(k.clone(), t.clone());
                } else {
                    frozen.insert(k.clone(), t.clone());
                }
            }
            let (trained, vars) = Weights::from_map(to_train).into_vars()?;
            let frozen = Weights::from_map(frozen);
            let mut all = frozen.clone();
            for (k, t) in trained.tensors() {
                all.insert(k.clone(), t.clone());
            }
            let half = mixed
                .then(|| -> Result<HalfModel> {
                    Ok(HalfModel {
                        dtype: compute,
                        base: frozen.to_dtype(compute)?,
                        trained,
                        lora_scale: None,
                    })
                })
                .transpose()?;
            let model = match &half {
                Some(h) => h.build(&mcfg)?,
                None => Llama::new(&mcfg, &all)?,
            };
            (all, model, vars, None, half)
        }
        Some(lc) => {
            let n = mcfg.num_hidden_layers;
            let top = cfg.trainable.top_layers.unwrap_or(n).min(n);
            let adapters = match &resume_dir {
                Some(d) => {
                    let p = d.join(LORA_FILE);
                    let t = candle_core::safetensors::load(&p, &dev)
                        .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
                    Weights::from_map(t.into_iter().collect())
                }
                None => init_adapters(&mcfg, &ck.weights, lc, n - top..n, cfg.seed, &dev)?,
            };
            let (adapters, vars) = adapters.into_vars()?;
            let all = ck.weights.clone();
            let half = mixed
                .then(|| -> Result<HalfModel> {
                    Ok(HalfModel {
                        dtype: compute,
                        base: all.to_dtype(compute)?,
                        trained: adapters.clone(),
                        lora_scale: Some(lc.scale()),
                    })
                })
                .transpose()?;
            let model = match &half {
                Some(h) => h.build(&mcfg)?,
                None => Llama::new(&mcfg, &all)?.with_lora(&adapters, lc.scale())?,
            };
            (all, model, vars, Some((adapters, lc.scale())), half)
        }
    };
    // What a checkpoint holds: the weights (LoRA merged in) and the adapters.
    let export = |all: &Weights| -> Result<Weights> {
        let merged = match &adapters {
            None => all.clone(),
            Some((a, scale)) => merge(all, a, *scale)?,
        };
        Ok(merged.to_dtype(stored_dtype)?)
    };
    let frozen_layers = frozen_prefix_layers(&mcfg, &cfg.trainable);
    let mut cache = match (&cfg.prefix_cache, frozen_layers) {
        (Some(dir), k) if k > 0 => Some(PrefixCache::open(
            dir,
            &model,
            &all,
            k,
            cfg.prefix_cache_dtype,
        )?),
        _ => None,
    };
    let init_s = state.as_ref().map(|s| s.log_sigma).unwrap_or([0.0; 3]);
    let sigma_vars: Vec<Var> = init_s
        .iter()
        .map(|&s| Var::new(s, &dev))
        .collect::<candle_core::Result<_>>()?;
    let log_sigma: [Tensor; 3] = [
        sigma_vars[0].as_tensor().clone(),
        sigma_vars[1].as_tensor().clone(),
        sigma_vars[2].as_tensor().clone(),
    ];
    let mut params: Vec<(String, Var, bool)> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.clone(), v.as_tensor().rank() > 1))
        .collect();
    if cfg.mode == LossMode::Steper {
        for (j, v) in sigma_vars.iter().enumerate() {
            params.push((format!("sigma.{}", Stage::NAMES[j]), v.clone(), false));
        }
    }
    let mut opt = AdamW::new(cfg.adamw.clone(), params)?;
    if let Some(sigma_lr) = cfg.adamw.sigma_lr {
        if !(sigma_lr.is_finite() && sigma_lr >= 0.0 && cfg.adamw.lr > 0.0) {
            return Err(Error::Input(format!(
                "σ learning rate {sigma_lr} (weights {}): expected a finite rate ≥ 0 and a weight rate > 0",
                cfg.adamw.lr
            )));
        }
        for p in opt
            .params
            .iter_mut()
            .filter(|p| p.name.starts_with("sigma."))
        {
            p.lr_scale = sigma_lr / cfg.adamw.lr;
        }
    }
    let start_step = state.as_ref().map(|s| s.step).unwrap_or(0);
    // f16 scales the loss; a resumed run continues the saved scaler.
    let mut scaler = (compute == DType::F16).then(|| {
        state
            .as_ref()
            .and_then(|s| s.loss_scaler)
            .unwrap_or_else(|| LossScaler::new(&cfg.loss_scale))
    });
    let mut skipped_steps = 0u64;
    if let (Some(s), Some(d)) = (&state, &resume_dir) {
        let p = d.join(OPTIM_FILE);
        let loaded = candle_core::safetensors::load(&p, &dev)
            .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
        opt.load_state(s.optimizer_t, &loaded.into_iter().collect())?;
    }
    // The log keeps exactly the steps up to the resume point.
    let log_path = out.join(LOG_FILE);
    {
        let kept: Vec<String> = std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<LogLine>(l)
                    .map(|x| x.step <= start_step)
                    .unwrap_or(false)
            })
            .map(|l| l.to_string())
            .collect();
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        write_atomic(&log_path, text.as_bytes())?;
    }
    let mut log_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::Io {
            path: log_path.clone(),
            source: e,
        })?;

    let mut stream = BatchStream {
        n: train.len(),
        batch: cfg.batch_size,
        bucket: cfg.bucket_batches,
        seed: cfg.seed,
        lens: train.iter().map(|e| e.input_len()).collect(),
        epoch: None,
    };
    let bar = if progress {
        let b = indicatif::ProgressBar::new(cfg.steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(start_step);
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    let run_start = std::time::Instant::now();
    let mut run_tokens = 0usize;
    let mut last: Option<LogLine> = None;
    let mut step = start_step;
    let n_params = opt.params.len();
    while step < cfg.steps {
        if let Some(n) = cfg.stop_after {
            if step - start_step >= n {
                break;
            }
        }
        let t0 = std::time::Instant::now();
        let lr = lr_at(step, cfg.steps, cfg.warmup, cfg.adamw.lr, cfg.min_lr_ratio);
        let mut acc: Vec<Option<Tensor>> = vec![None; n_params];
        let mut stage_sum = [0f64; 3];
        let mut stage_n = [0usize; 3];
        let mut total_sum = 0f64;
        let mut tokens = 0usize;
        // Mixed precision: this step's half-precision model of the current master weights.
        let step_model = half.as_ref().map(|h| h.build(&mcfg)).transpose()?;
        let model_now = step_model.as_ref().unwrap_or(&model);
        let loss_scale = scaler.map(|s| s.scale);
        for micro in 0..cfg.grad_accum {
            let idx = stream.get(step * cfg.grad_accum as u64 + micro as u64);
            let refs: Vec<&Example> = idx.iter().map(|&i| &train[i]).collect();
            let b = make_batch(&refs, &dev)?;
            tokens += b.tokens;
            let mut prefix = Prefix {
                frozen_layers,
                cache: cache.as_mut(),
            };
            let sl = batch_losses(model_now, &refs, &b, &mut prefix)?;
            let Some(total) = combine(&sl, cfg.mode, &log_sigma)? else {
                continue;
            };
            for j in 0..3 {
                if let Some(l) = &sl.losses[j] {
                    stage_sum[j] += l.to_scalar::<f32>()? as f64;
                    stage_n[j] += 1;
                }
            }
            total_sum += total.to_scalar::<f32>()? as f64;
            let scaled = match loss_scale {
                None => (total / cfg.grad_accum as f64)?,
                Some(s) => (total * (s / cfg.grad_accum as f64))?,
            };
            let grads = scaled.backward()?;
            for (a, p) in acc.iter_mut().zip(&opt.params) {
                if let Some(g) = grads.get(p.var.as_tensor()) {
                    *a = Some(match a.take() {
                        None => g.clone(),
                        Some(prev) => (prev + g)?,
                    });
                }
            }
        }
        if let Some(s) = loss_scale {
            for g in acc.iter_mut().flatten() {
                *g = (&*g / s)?;
            }
        }
        let grad_norm = clip_global_norm(&mut acc, cfg.max_grad_norm)?;
        let apply = match scaler.as_mut() {
            Some(sc) => sc.update(grad_norm.is_finite(), &cfg.loss_scale),
            None => true,
        };
        if apply {
            opt.step(&acc, lr)?;
        } else {
            skipped_steps += 1;
        }
        drop(step_model);
        step += 1;
        run_tokens += tokens;
        let secs = t0.elapsed().as_secs_f64();
        let sig: Vec<f64> = sigma_vars
            .iter()
            .map(|v| v.as_tensor().to_scalar::<f32>().map(|s| (s as f64).exp()))
            .collect::<candle_core::Result<_>>()?;
        let mean = |j: usize| (stage_n[j] > 0).then(|| stage_sum[j] / stage_n[j] as f64);
        let eval_now = !eval.is_empty()
            && ((cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) || step == cfg.steps);
        let line = LogLine {
            step,
            lr,
            l_init: mean(0),
            l_exp: mean(1),
            l_agg: mean(2),
            total: total_sum / cfg.grad_accum as f64,
            sigma_init: sig[0],
            sigma_exp: sig[1],
            sigma_agg: sig[2],
            grad_norm,
            tokens_per_sec: tokens as f64 / secs.max(1e-9),
            loss_scale,
            skipped: !apply,
            eval: if eval_now {
                let mut prefix = Prefix {
                    frozen_layers,
                    cache: cache.as_mut(),
                };
                let updated = half.as_ref().map(|h| h.build(&mcfg)).transpose()?;
                let m = updated.as_ref().unwrap_or(&model);
                Some(evaluate(m, eval, cfg.batch_size, &mut prefix)?)
            } else {
                None
            },
        };
        let text = serde_json::to_string(&line).map_err(|e| Error::Input(e.to_string()))?;
        writeln!(log_file, "{text}").map_err(|e| Error::Io {
            path: log_path.clone(),
            source: e,
        })?;
        bar.set_position(step);
        let f = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        bar.set_message(format!(
            "L_init {} L_exp {} L_agg {} σ {:.2}/{:.2}/{:.2} {:.0} tok/s",
            f(line.l_init),
            f(line.l_exp),
            f(line.l_agg),
            sig[0],
            sig[1],
            sig[2],
            line.tokens_per_sec
        ));
        last = Some(line);
        let save_now = (cfg.save_every > 0 && step.is_multiple_of(cfg.save_every))
            || step == cfg.steps
            || cfg
                .stop_after
                .map(|n| step - start_step >= n)
                .unwrap_or(false);
        if save_now {
            if let Some(c) = cache.as_mut() {
                c.flush()?;
            }
            let s = TrainerState {
                step,
                optimizer_t: opt.t,
                log_sigma: [
                    sigma_vars[0].as_tensor().to_scalar()?,
                    sigma_vars[1].as_tensor().to_scalar()?,
                    sigma_vars[2].as_tensor().to_scalar()?,
                ],
                config: cfg.clone(),
                num_examples: train.len(),
                device: Some(device_name(&dev)),
                compute_dtype: Some(compute.as_str().into()),
                loss_scaler: scaler,
            };
            save_checkpoint(
                out,
                &tokenizer_from,
                &mcfg,
                &export(&all)?,
                adapters.as_ref().map(|a| &a.0),
                &opt,
                &s,
            )?;
        }
    }
    bar.finish_and_clear();
    if let Some(c) = cache.as_mut() {
        c.flush()?;
    }
    let finished = step >= cfg.steps;
    let final_eval = if finished && !eval.is_empty() {
        last.as_ref().and_then(|l| l.eval.clone())
    } else {
        None
    };
    if finished {
        // The final model also lands at the top level of `out`, swapped in whole (the
        // checkpoints and the log are carried over), so a run killed while saving leaves no
        // mix of old and new shards there.
        let stage = StagingDir::new(out, steper_fsutil::Existing::Merge)?;
        Checkpoint::save(
            stage.path(),
            &mcfg,
            &export(&all)?,
            Some(cfg.max_shard_bytes),
        )?;
        copy_companions(&tokenizer_from, stage.path())?;
        stage.merge(&[])?;
    }
    let seconds = run_start.elapsed().as_secs_f64();
    Ok(FitSummary {
        step,
        finished,
        resumed_from: start_step,
        last,
        trainable_parameters: vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum(),
        total_parameters: all.num_parameters(),
        tokens_per_sec: run_tokens as f64 / seconds.max(1e-9),
        seconds,
        eval: final_eval,
        frozen_layers,
        prefix_cache: cache.map(|c| c.stats),
        device: device_name(&dev),
        compute_dtype: compute.as_str().into(),
        skipped_steps,
    })
}

/// The student's tokenizer, tokenizer config (chat template) and generation config travel
/// unchanged with every checkpoint.
fn copy_companions(from: &Path, to: &Path) -> Result<()> {
    steper_models::copy_companion_files(from, to)?;
    Ok(())
}

fn save_checkpoint(
    out: &Path,
    tokenizer_from: &Path,
    cfg: &LlamaConfig,
    weights: &Weights,
    adapters: Option<&Weights>,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<()> {
    let dest = out.join(CKPT_DIR).join(format!("step-{:08}", state.step));
    let stage = StagingDir::new(&dest, steper_fsutil::Existing::Refuse)?;
    Checkpoint::save(
        stage.path(),
        cfg,
        weights,
        Some(state.config.max_shard_bytes),
    )?;
    if let Some(a) = adapters {
        let named: Vec<(&String, &Tensor)> = a.tensors().iter().collect();
        let bytes = safetensors::serialize(named.iter().map(|(k, v)| (k.as_str(), *v)), None)
            .map_err(|e| Error::Input(format!("cannot serialize LoRA adapters: {e}")))?;
        write_atomic(&stage.path().join(LORA_FILE), &bytes)?;
    }
    copy_companions(tokenizer_from, stage.path())?;
    let opt_state: Vec<(String, Tensor)> = opt.state_tensors().into_iter().collect();
    let bytes = safetensors::serialize(opt_state.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| Error::Input(format!("cannot serialize optimizer state: {e}")))?;
    write_atomic(&stage.path().join(OPTIM_FILE), &bytes)?;
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::Input(e.to_string()))?;
    write_atomic(&stage.path().join(STATE_FILE), text.as_bytes())?;
    stage.commit()?;
    // Keep the two newest checkpoints.
    let dir = out.join(CKPT_DIR);
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(|e| Error::Io {
            path: dir.clone(),
            source: e,
        })?
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    steps.sort();
    // An old checkpoint is renamed aside before it is deleted, so a run killed meanwhile never
    // leaves a half-deleted one under its name; leftovers of killed runs are swept here.
    while steps.len() > 2 {
        let (_, p) = steps.remove(0);
        steper_fsutil::remove_dir_atomically(&p)?;
    }
    steper_fsutil::remove_stale_temporaries_in(&dir);
    Ok(())
}
