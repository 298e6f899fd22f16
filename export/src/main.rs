//! `steper-export`: checkpoint → ONNX (KV cache) + manifest files, optionally verified against
//! the candle model on ONNX Runtime and tract; or checkpoint → GGUF on its base GGUF
//! (`--format gguf`, [`steper_models::gguf::export_gguf`]). Thin: argument parsing and dispatch.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use steper_export::{
    export_with_calibration, verify, ExportDtype, ExportOptions, ExternalData, QuantBits,
    QuantOptions, QuantTarget, ZeroPoints,
};

/// Export a STEPER checkpoint to ONNX with a KV cache (for steper-run), or to a GGUF file for
/// llama.cpp on the base GGUF it was imported from (--format gguf).
#[derive(Parser)]
#[command(name = "steper-export", version, about)]
struct Args {
    /// Checkpoint directory (config.json + model.safetensors [+ tokenizer.json]).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Weight precision: fp32 or fp16.
    #[arg(long, default_value = "fp32")]
    dtype: String,
    /// ONNX opset (17 or 18; 21 with --target portable, the default there; 17 otherwise).
    #[arg(long)]
    opset: Option<i64>,
    /// Quantize the linear layers' weights: int4 or int8 (block-wise, round-to-nearest or GPTQ
    /// with --calibration, symmetric unless --zero-points; activations stay --dtype).
    #[arg(long)]
    quantize: Option<String>,
    /// Weights per quantization block along the input dimension (one scale each); must divide
    /// every quantized layer's input dimension. Needs --quantize.
    #[arg(long)]
    block_size: Option<usize>,
    /// ONNX form of the quantized layers: ort-cpu (com.microsoft MatMulNBits, accuracy_level 4)
    /// or portable (DequantizeLinear + MatMul, opset 21). Needs --quantize.
    #[arg(long)]
    target: Option<String>,
    /// Quantize the vocabulary projection too (lm_head / the tied embedding's projection; the
    /// embedding lookup stays float). Needs --quantize.
    #[arg(long)]
    quantize_lm_head: Option<bool>,
    /// Asymmetric blocks. `--zero-points` (= int): an integer zero point per block beside its
    /// scale (MatMulNBits `zero_points`, DequantizeLinear `x_zero_point`), so a block's codes span
    /// its own [min, max] widened to hold 0 rather than ±max. `--zero-points float`: a float
    /// minimum per block (llama.cpp's Q4_1 form), added as a block-sum correction beside
    /// MatMulNBits; exact for layers still on a Q4_1 grid (imported from a GGUF and frozen);
    /// --target ort-cpu only. Needs --quantize.
    #[arg(long, value_name = "none|int|float", num_args = 0..=1, default_missing_value = "int")]
    zero_points: Option<String>,
    /// With --quantize int4 --zero-points float: a layer that int4 cannot reproduce exactly (one
    /// that training moved off the GGUF's Q4_1 grid, e.g. the top layers of a student trained
    /// with --top-layers) is quantized to int8 instead, so the update training made survives.
    #[arg(long)]
    off_grid_int8: bool,
    /// Quantize with GPTQ instead of round-to-nearest, using the Hessians that `steper-calibrate
    /// --hessians` wrote into this directory for this checkpoint's fp32 export (refused when made
    /// for another model). Needs --quantize; --verify recomputes the same codes from it.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Attention form: standard (standard ONNX operators; every backend, left-padded batches)
    /// or gqa (ONNX Runtime's com.microsoft GroupQueryAttention: one fused kernel appends the
    /// KV cache and attends; ONNX Runtime only, fp32 activations, batch-1 decoding).
    #[arg(long, default_value = "standard")]
    attention: String,
    /// How the student's step prompts are laid out, as it was trained: plain (the IRCoT text)
    /// or chat (inside the checkpoint's chat template, copied beside the model); recorded in
    /// steper.json.
    #[arg(long, default_value = "plain")]
    prompt_format: String,
    /// The framework the student was trained for: ircot (each step states a sentence) or
    /// self-ask (each step asks a follow-up question and answers it); recorded in steper.json,
    /// where the runtime's loop takes it from.
    #[arg(long, default_value = "ircot", value_name = "ircot|self-ask")]
    framework: steper_runtime::Framework,
    /// Always write the weights to model.onnx.data (otherwise only above 2 GB).
    #[arg(long)]
    external_data: bool,
    /// Run the export on ONNX Runtime and tract against the candle model and report parity.
    #[arg(long)]
    verify: bool,
    /// Decode steps checked by --verify (greedy tokens after the prompt).
    #[arg(long, default_value_t = 32)]
    verify_steps: usize,
    /// Prompt used by --verify (tokenized with the checkpoint's tokenizer when present).
    #[arg(long)]
    verify_prompt: Option<String>,
    /// Skip tract in --verify.
    #[arg(long)]
    no_tract: bool,
    /// Device of --verify's candle reference: cpu | cuda | cuda:N (cuda needs a build with
    /// `--features cuda`).
    #[arg(long, visible_alias = "device", default_value = "cpu")]
    verify_device: steper_models::DeviceChoice,
    /// Output format: onnx (a model directory for steper-run: ONNX Runtime, tract, TensorRT) or
    /// gguf (one file for llama.cpp, llama-server, Ollama; --out is the file, --gguf-base the
    /// GGUF the checkpoint was imported from, whose metadata and tokenizer are copied and whose
    /// blocks are kept for every tensor training left unchanged).
    #[arg(long, default_value = "onnx", value_name = "onnx|gguf")]
    format: String,
    /// With --format gguf: the GGUF the checkpoint was imported from (`steper-train import`);
    /// refused when made for another model.
    #[arg(long, value_name = "FILE")]
    gguf_base: Option<PathBuf>,
    /// With --format gguf: how the tensors training changed are stored (q8_0, f16 or f32;
    /// default q8_0); norms and biases stay f32.
    #[arg(long, value_name = "TYPE")]
    gguf_type: Option<String>,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

impl Args {
    /// The options that shape `--quantize` (whether each is set, its flag).
    fn quantization_options(&self) -> [(bool, &'static str); 6] {
        [
            (self.block_size.is_some(), "--block-size"),
            (self.target.is_some(), "--target"),
            (self.quantize_lm_head.is_some(), "--quantize-lm-head"),
            (self.zero_points.is_some(), "--zero-points"),
            (self.off_grid_int8, "--off-grid-int8"),
            (self.calibration.is_some(), "--calibration"),
        ]
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    steper_runtime::backend::set_library_env(None);
    match run(args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run(a: Args) -> anyhow::Result<bool> {
    match a.format.as_str() {
        "onnx" => {
            for (set, name) in [
                (a.gguf_base.is_some(), "--gguf-base"),
                (a.gguf_type.is_some(), "--gguf-type"),
            ] {
                if set {
                    anyhow::bail!("option `{name}` needs --format gguf");
                }
            }
        }
        "gguf" => return run_gguf(&a).map(|()| true),
        other => anyhow::bail!("--format: expected onnx or gguf, got `{other}`"),
    }
    let quantize = match &a.quantize {
        Some(bits) => {
            let d = QuantOptions::int4();
            Some(QuantOptions {
                bits: bits.parse::<QuantBits>()?,
                block_size: a.block_size.unwrap_or(d.block_size),
                target: match &a.target {
                    Some(t) => t.parse::<QuantTarget>()?,
                    None => d.target,
                },
                lm_head: a.quantize_lm_head.unwrap_or(d.lm_head),
                zero_points: match &a.zero_points {
                    Some(z) => z.parse::<ZeroPoints>()?,
                    None => d.zero_points,
                },
                off_grid_int8: a.off_grid_int8,
            })
        }
        None => {
            for (set, name) in a.quantization_options() {
                if set {
                    anyhow::bail!("option `{name}` needs --quantize int4|int8");
                }
            }
            None
        }
    };
    let portable = quantize.map(|q| q.target) == Some(QuantTarget::Portable);
    let opts = ExportOptions {
        dtype: a.dtype.parse::<ExportDtype>()?,
        opset: a.opset.unwrap_or(if portable {
            steper_export::graph::PORTABLE_OPSET
        } else {
            17
        }),
        external_data: if a.external_data {
            ExternalData::Always
        } else {
            ExternalData::Auto
        },
        quantize,
        attention: a
            .attention
            .parse::<steper_export::AttentionOp>()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        prompt_format: a
            .prompt_format
            .parse::<steper_runtime::prompt::PromptFormat>()
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        framework: a.framework,
    };
    let report = export_with_calibration(&a.checkpoint, &a.out, &opts, a.calibration.as_deref())
        .with_context(|| format!("exporting {}", a.checkpoint.display()))?;
    if a.json && !a.verify {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !a.json {
        eprintln!(
            "wrote {} ({} nodes, {} MB of weights, {}{}, opset {}, IR {})",
            report.model_file.display(),
            report.nodes,
            report.weight_bytes / 1_000_000,
            report.dtype.as_str(),
            match &opts.quantize {
                Some(q) => format!(" activations, {}", steper_export::graph::describe(q)),
                None => String::new(),
            },
            report.opset,
            report.ir_version
        );
        if let Some(dir) = &a.calibration {
            eprintln!("GPTQ with the Hessians of {}", dir.display());
        }
    }
    if !a.verify {
        return Ok(true);
    }
    let defaults = verify::VerifyOptions::for_export(opts.dtype, opts.quantize.as_ref());
    if !a.no_tract && defaults.tract && !opts.attention.is_standard() {
        eprintln!(
            "note: tract has no GroupQueryAttention (--attention gqa); verifying on ONNX Runtime"
        );
    }
    if !a.no_tract && !defaults.tract {
        eprintln!(
            "note: the runtime does not run quantized exports on tract 0.23; verifying on ONNX Runtime"
        );
    }
    let vopts = verify::VerifyOptions {
        steps: a.verify_steps,
        prompt: a.verify_prompt.clone(),
        tract: !a.no_tract && defaults.tract,
        device: a.verify_device,
        calibration: a.calibration.clone(),
        ..defaults
    };
    let v = verify::verify(&a.checkpoint, &a.out, &vopts).context("verifying the export")?;
    if a.json {
        println!("{}", serde_json::json!({"export": report, "verify": v}));
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(v.pass)
}

/// `--format gguf`: the checkpoint as one llama.cpp file on the base GGUF it was imported from.
fn run_gguf(a: &Args) -> anyhow::Result<()> {
    let onnx_only = [
        (a.quantize.is_some(), "--quantize"),
        (a.opset.is_some(), "--opset"),
        (a.external_data, "--external-data"),
        (a.verify, "--verify"),
        (a.dtype != "fp32", "--dtype"),
        (a.attention != "standard", "--attention"),
        (a.prompt_format != "plain", "--prompt-format"),
        (
            a.framework != steper_runtime::Framework::Ircot,
            "--framework",
        ),
        (a.verify_prompt.is_some(), "--verify-prompt"),
        (a.no_tract, "--no-tract"),
    ];
    for (set, name) in onnx_only.into_iter().chain(a.quantization_options()) {
        if set {
            anyhow::bail!(
                "option `{name}` is for --format onnx; a GGUF keeps the base's blocks for frozen tensors and --gguf-type for trained ones"
            );
        }
    }
    let base = a
        .gguf_base
        .as_deref()
        .context("--format gguf needs --gguf-base FILE: the GGUF the checkpoint was imported from (its metadata and tokenizer are copied)")?;
    if a.out.extension().and_then(|e| e.to_str()) != Some("gguf") {
        anyhow::bail!(
            "--out {}: with --format gguf the output is one file; expected a path ending in .gguf",
            a.out.display()
        );
    }
    let ty = match &a.gguf_type {
        Some(t) => t.parse::<steper_models::gguf::GgufTensorType>()?,
        None => steper_models::gguf::GgufTensorType::Q8_0,
    };
    let report = steper_models::gguf::export_gguf(&a.checkpoint, base, &a.out, ty)
        .with_context(|| format!("exporting {} as GGUF", a.checkpoint.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "wrote {} ({} tensors: {} kept as the base {} stores them, {} rewritten as {}; {} MB)",
            report.out.display(),
            report.tensors,
            report.copied,
            base.display(),
            report.rewritten.len(),
            serde_json::to_value(report.trained_type)?
                .as_str()
                .unwrap_or_default(),
            report.bytes / 1_000_000
        );
    }
    Ok(())
}
