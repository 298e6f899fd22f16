//! `steper-train fit`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use steper_models::{
    load_tokenizer, DTypeChoice, DeviceChoice, LlamaConfig, LoraConfig, LoraTarget,
};
use steper_train::fit::optim::AdamWConfig;
use steper_train::fit::records::{examples_from_records_in, read_records};
use steper_train::fit::{fit, CacheDtype, FitConfig, LossMode, LossScaleConfig, Trainable};

/// Arguments of `fit`.
#[derive(clap::Args)]
pub struct Args {
    /// Student checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    student: PathBuf,
    /// Step-wise records (JSONL) from `steper-train distill`.
    #[arg(long)]
    data: PathBuf,
    /// Output directory (final checkpoint, checkpoints/step-N, train_log.jsonl). An existing
    /// run there is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Loss: σ-weighted (steper), uniform average, or vanilla-KD.
    #[arg(long, value_enum, default_value_t = LossMode::Steper)]
    mode: LossMode,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Train for this many passes over the training examples instead of a step count (steps =
    /// ⌈epochs × ⌈examples / batch-size⌉ / grad-accum⌉), so runs on record kinds of different
    /// sizes see their whole data the same number of times.
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f64>,
    /// Train on the records of this many training questions only, the same questions for every
    /// mode and seed on the same records (a fixed order of question ids; held-out questions are
    /// never among them). With step-wise and whole-chain records of one teacher run this gives
    /// every mode the same teacher data.
    #[arg(long)]
    train_questions: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Peak learning rate of the σ difficulties (steper mode; default: --lr). Their Adam step is
    /// about the learning rate, so a short run needs a larger one (e.g. 1e-2) for σ to move.
    #[arg(long)]
    sigma_lr: Option<f64>,
    /// AdamW weight decay (not on norms or σ).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Seed of the data order and the held-out split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of questions held out for the evaluation loss.
    #[arg(long, default_value_t = 0.1)]
    eval_fraction: f64,
    /// Evaluate every N steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Keep the embeddings frozen.
    #[arg(long)]
    freeze_embeddings: bool,
    /// Train only the top N layers.
    #[arg(long)]
    top_layers: Option<usize>,
    /// Cache of the frozen bottom's hidden states (with --freeze-embeddings and --top-layers):
    /// computed once per record, reused by later epochs and by later runs (other modes, seeds)
    /// on the same student; rebuilt when it does not match the student or the frozen layers.
    #[arg(long)]
    prefix_cache: Option<PathBuf>,
    /// Train LoRA adapters of rank R (every base weight frozen; with --top-layers only the top
    /// N layers get adapters). Saved checkpoints hold the merged weights.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA α (the update is scaled by α / R); default 2·R.
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Projections that get adapters: some of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    lora_targets: String,
    /// Element type of the prefix cache.
    #[arg(long, value_enum, default_value_t = CacheDtype::F16)]
    prefix_cache_dtype: CacheDtype,
    /// Dtype training computes in: auto | f32 (f32 throughout) | bf16 | f16 (mixed precision:
    /// the forward and backward in the half type, f32 master weights, optimizer state and σ;
    /// f16 with dynamic loss scaling). Checkpoints keep the student's stored dtype (bf16 stays
    /// bf16) whatever this is.
    #[arg(long, default_value = "auto")]
    dtype: DTypeChoice,
    /// Device to train on: cpu | cuda | cuda:N (cuda needs a build with `--features cuda`). A
    /// resumed run may use another device than the run it resumes.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// f16 training: the first loss scale.
    #[arg(long, default_value_t = LossScaleConfig::default().init)]
    loss_scale_init: f64,
    /// f16 training: finite steps in a row after which the loss scale doubles (a step with
    /// non-finite gradients is skipped and halves it).
    #[arg(long, default_value_t = LossScaleConfig::default().growth_interval)]
    loss_scale_growth_interval: u64,
    /// Largest safetensors file written, in bytes; larger weights are sharded with
    /// model.safetensors.index.json (transformers' max_shard_size, default 5 GB).
    #[arg(long, default_value_t = steper_models::weights::DEFAULT_MAX_SHARD_BYTES)]
    max_shard_size: usize,
    /// Words kept per passage in the prompt.
    #[arg(long, default_value_t = 100)]
    word_cap: usize,
    /// How step prompts are laid out: plain (the IRCoT text) or chat (inside the student's chat
    /// template from its tokenizer_config.json); export with the same --prompt-format.
    #[arg(long, default_value = "plain")]
    prompt_format: String,
    /// The framework the records were distilled for (ircot or self-ask); records of another
    /// framework are refused. Default: the records' own (one framework per file).
    #[arg(long, value_name = "ircot|self-ask")]
    framework: Option<steper_runtime::Framework>,
    /// Skip malformed record lines (counted) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The LoRA settings of `--lora-rank/--lora-alpha/--lora-targets` (none without a rank).
pub fn lora_config(
    rank: Option<usize>,
    alpha: Option<f64>,
    targets: &str,
) -> Result<Option<LoraConfig>> {
    let Some(rank) = rank else {
        return Ok(None);
    };
    anyhow::ensure!(rank > 0, "--lora-rank must be positive");
    let targets = LoraTarget::parse_list(targets).context("--lora-targets")?;
    Ok(Some(LoraConfig {
        rank,
        alpha: alpha.unwrap_or(2.0 * rank as f64),
        targets,
    }))
}

/// The f16 loss-scaling settings of `--loss-scale-init/--loss-scale-growth-interval`.
pub fn loss_scale_config(init: f64, growth_interval: u64) -> Result<LossScaleConfig> {
    anyhow::ensure!(
        init.is_finite() && init > 0.0,
        "--loss-scale-init must be a positive finite number, got {init}"
    );
    Ok(LossScaleConfig {
        init,
        growth_interval,
    })
}

/// Optimizer steps for `epochs` passes over `examples` in micro-batches of `batch` with
/// `accum` micro-batches per step (at least one step).
pub fn steps_for_epochs(epochs: f64, examples: usize, batch: usize, accum: usize) -> Result<u64> {
    anyhow::ensure!(
        epochs.is_finite() && epochs > 0.0,
        "--epochs must be a positive number, got {epochs}"
    );
    anyhow::ensure!(
        batch > 0 && accum > 0,
        "--batch-size and --grad-accum must be positive"
    );
    let micro = examples.div_ceil(batch) as f64 * epochs;
    Ok(((micro / accum as f64).ceil() as u64).max(1))
}

/// Renders, tokenizes, splits and trains.
pub fn run(a: Args) -> Result<()> {
    let cfg_path = a.student.join("config.json");
    let mcfg = LlamaConfig::from_file(&cfg_path)
        .with_context(|| format!("student {}", a.student.display()))?;
    let tok = load_tokenizer(&a.student.join("tokenizer.json"), mcfg.vocab_size)?;
    let eos = *mcfg
        .eos_ids()
        .first()
        .context("student config.json has no eos_token_id")?;
    let (records, skipped) = read_records(&a.data, a.skip_bad)?;
    steper_train::fit::records::records_framework(&records, a.framework)
        .with_context(|| format!("--data {}", a.data.display()))?;
    let (mut train_r, eval_r) =
        steper_train::fit::records::split_by_question(&records, a.eval_fraction, a.seed);
    let mut questions_note = String::new();
    if let Some(n) = a.train_questions {
        anyhow::ensure!(n > 0, "--train-questions must be positive");
        let (kept, total) = steper_train::fit::records::first_questions(&train_r, n);
        questions_note = format!(", {} of {total} training questions", n.min(total));
        train_r = kept;
    }
    let format = a
        .prompt_format
        .parse::<steper_runtime::prompt::PromptFormat>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let layout = steper_runtime::prompt::PromptLayout::load(format, &a.student)?;
    let train = examples_from_records_in(
        &layout,
        &train_r,
        &tok,
        a.word_cap,
        eos,
        mcfg.max_position_embeddings,
    )?;
    let eval = examples_from_records_in(
        &layout,
        &eval_r,
        &tok,
        a.word_cap,
        eos,
        mcfg.max_position_embeddings,
    )?;
    let steps = match a.epochs {
        Some(e) => steps_for_epochs(e, train.len(), a.batch_size, a.grad_accum)?,
        None => a.steps,
    };
    let cfg = FitConfig {
        mode: a.mode,
        steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        adamw: AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            sigma_lr: a.sigma_lr,
            ..Default::default()
        },
        warmup: a.warmup,
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        trainable: Trainable {
            freeze_embeddings: a.freeze_embeddings,
            top_layers: a.top_layers,
            lora: lora_config(a.lora_rank, a.lora_alpha, &a.lora_targets)?,
        },
        prefix_cache: a.prefix_cache.clone(),
        prefix_cache_dtype: a.prefix_cache_dtype,
        dtype: a.dtype,
        device: a.device,
        loss_scale: loss_scale_config(a.loss_scale_init, a.loss_scale_growth_interval)?,
        max_shard_bytes: a.max_shard_size,
        ..Default::default()
    };
    let summary = fit(&a.student, &train, &eval, &cfg, &a.out, !a.json)?;
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        v["train_examples"] = train.len().into();
        v["eval_examples"] = eval.len().into();
        v["skipped_lines"] = skipped.into();
        v["steps"] = steps.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let l = summary.last.as_ref();
        println!(
            "{} step {} ({} train / {} held-out examples{questions_note}, {skipped} bad lines skipped): total {:.4}, σ {:.3}/{:.3}/{:.3}, {:.0} tok/s, {:.1}s → {}",
            if summary.finished { "finished" } else { "stopped at" },
            summary.step,
            train.len(),
            eval.len(),
            l.map(|l| l.total).unwrap_or(f64::NAN),
            l.map(|l| l.sigma_init).unwrap_or(f64::NAN),
            l.map(|l| l.sigma_exp).unwrap_or(f64::NAN),
            l.map(|l| l.sigma_agg).unwrap_or(f64::NAN),
            summary.tokens_per_sec,
            summary.seconds,
            a.out.display()
        );
        if let Some(e) = &summary.eval {
            println!(
                "held-out loss: init {:?} expand {:?} aggregate {:?}",
                e.l_init, e.l_exp, e.l_agg
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::steps_for_epochs;

    #[test]
    fn epochs_become_whole_optimizer_steps() {
        assert_eq!(steps_for_epochs(1.0, 10, 2, 1).unwrap(), 5);
        assert_eq!(steps_for_epochs(1.0, 11, 2, 1).unwrap(), 6);
        assert_eq!(steps_for_epochs(2.0, 11, 2, 4).unwrap(), 3);
        assert_eq!(steps_for_epochs(0.01, 11, 2, 1).unwrap(), 1);
        assert!(steps_for_epochs(0.0, 11, 2, 1).is_err());
        assert!(steps_for_epochs(f64::NAN, 11, 2, 1).is_err());
        assert!(steps_for_epochs(1.0, 11, 0, 1).is_err());
    }
}
