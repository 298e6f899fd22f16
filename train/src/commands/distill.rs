//! `steper-train distill`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use steper_runtime::data::{read_qa, ReadOptions};
use steper_runtime::prompt::{PromptFormat, PromptLayout};
use steper_runtime::retrieval::Bm25Index;
use steper_runtime::LoopOptions;
use steper_train::distill::{distill, distill_pool, write_summary, DistillOptions, Filter};
use steper_train::teacher::{
    self_ask_hops, CandleTeacher, GoldSelfAskTeacher, GoldTeacher, OpenAiConfig, OpenAiTeacher,
    TeacherPrompt,
};

/// Arguments of `distill`.
#[derive(clap::Args)]
pub struct Args {
    /// `gold` (annotation-derived), `checkpoint:DIR` (a local Llama-family checkpoint in candle)
    /// or `openai:URL` (an OpenAI-compatible server, e.g. `openai:http://127.0.0.1:8080`).
    #[arg(long)]
    teacher: String,
    /// Model name sent to the OpenAI-compatible server (its `model` field).
    #[arg(long, default_value = "teacher")]
    teacher_model: String,
    /// Use `/v1/chat/completions` (the server applies the model's chat template; the
    /// instruction header becomes the system message) instead of `/v1/completions`. Same as
    /// `--prompt-format chat` for `openai:` teachers.
    #[arg(long)]
    teacher_chat: bool,
    /// How the LLM teachers are prompted: `plain` (the IRCoT text) or `chat`. With
    /// `checkpoint:DIR`, `chat` renders every step prompt inside the checkpoint's own chat
    /// template (DIR's tokenizer_config.json `chat_template` or chat_template.jinja), as
    /// `fit`, export, calibration and the runtime do; with `openai:URL` it sends
    /// `/v1/chat/completions` messages (as --teacher-chat; `plain` with --teacher-chat is
    /// refused). Records are layout-free either way (`fit --prompt-format` renders them); the
    /// gold teacher only records the value. Default: plain (chat with --teacher-chat).
    #[arg(long)]
    prompt_format: Option<String>,
    /// Environment variable holding the API key (sent as `Authorization: Bearer`); unset or
    /// empty: no key is sent.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    teacher_api_key_env: String,
    /// Instruction header and few-shot demonstrations for the LLM teachers (OpenAI-compatible
    /// and checkpoint): a file (format in train/prompts/ircot-fewshot.txt), `default` (that
    /// file, built in), `ircot:PATH[:N]` (IRCoT's CoT demonstrations, e.g.
    /// data/ircot_prompts/hotpotqa.txt, the first N) or `none` (the plain student
    /// prompt). The demonstrations must be of --framework's format: for self-ask, e.g.
    /// data/self_ask_prompts/demonstrations.txt. Step-wise records always keep the plain prompt.
    #[arg(long, default_value = "none")]
    teacher_prompt: String,
    /// The OpenAI teacher's context in tokens (header, demonstrations, prompt and new tokens);
    /// prompts are fitted into it, counted with --fit-student's tokenizer or, without it, as
    /// ⌈chars/4⌉. Unset: prompts are sent whole.
    #[arg(long)]
    teacher_context: Option<usize>,
    /// Sampling temperature of the OpenAI teacher (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seconds one HTTP request may take.
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    /// Retries of a request after 429, 5xx, a timeout or a connection error (exponential
    /// backoff with jitter from 0.5 s, Retry-After honoured).
    #[arg(long, default_value_t = 5)]
    max_retries: u32,
    /// Questions in flight at once (OpenAI teacher only); output stays in question order.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Maximum new tokens per step sentence.
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// QA questions (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// BM25 index (`steper-run index`).
    #[arg(long)]
    index: PathBuf,
    /// Output directory (traces.jsonl, stepwise.jsonl, vanilla.jsonl, summary.json); a run
    /// there is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Answer filter for keeping a question's records.
    #[arg(long, value_enum, default_value_t = Filter::Em)]
    filter: Filter,
    /// Also write Vanilla-KD records.
    #[arg(long)]
    vanilla: bool,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Passages per step.
    #[arg(long, default_value_t = 4)]
    top_k: usize,
    /// Maximum steps.
    #[arg(long, default_value_t = 5)]
    max_steps: usize,
    /// Student checkpoint whose tokenizer and context the gold teacher's prompts must fit (the
    /// OpenAI teacher counts --teacher-context tokens with its tokenizer).
    #[arg(long)]
    fit_student: Option<PathBuf>,
    /// Skip malformed question lines (counted).
    #[arg(long)]
    skip_bad: bool,
    /// Dtype a `checkpoint:` teacher computes in: auto (the stored dtype where the device runs
    /// it at full speed, else f32) | f32 | bf16 | f16.
    #[arg(long, default_value = "auto")]
    dtype: steper_models::DTypeChoice,
    /// Device a `checkpoint:` teacher runs on: cpu | cuda | cuda:N (cuda needs a build with
    /// `--features cuda`; the other teachers run no model here and take only cpu).
    #[arg(long, default_value = "cpu")]
    device: steper_models::DeviceChoice,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// How the loop reasons: ircot (each step states a sentence) or self-ask (each step asks a
    /// follow-up question and answers it); the records carry it, and `fit` renders them so.
    #[arg(long, default_value = "ircot", value_name = "ircot|self-ask")]
    framework: steper_runtime::Framework,
}

/// Runs the teacher over the questions.
pub fn run(a: Args) -> Result<()> {
    if !a.device.is_cpu() && !a.teacher.starts_with("checkpoint:") {
        bail!(
            "--device {} applies to a checkpoint: teacher only (--teacher {} runs no model here)",
            a.device,
            a.teacher
        );
    }
    let mut qs = read_qa(
        &a.data,
        ReadOptions {
            skip_bad: a.skip_bad,
        },
    )?
    .rows;
    if let Some(n) = a.limit {
        qs.truncate(n);
    }
    let index = Bm25Index::open(&a.index)?;
    let mut opts = DistillOptions {
        loop_opts: LoopOptions::default()
            .with_top_k(a.top_k)
            .with_max_steps(a.max_steps)
            .with_max_sentence_tokens(a.max_new_tokens)
            .with_framework(a.framework),
        filter: a.filter,
        vanilla: a.vanilla,
        stop_after: None,
    };
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.concurrency > 1 && !a.teacher.starts_with("openai:") {
        bail!("--concurrency > 1 needs --teacher openai:URL (local teachers run one question at a time)");
    }
    let format = prompt_format(a.prompt_format.as_deref(), a.teacher_chat)?;
    if a.teacher_chat && !a.teacher.starts_with("openai:") {
        bail!("--teacher-chat needs --teacher openai:URL (a checkpoint: teacher is put in its chat template by --prompt-format chat)");
    }
    // The demonstrations must be of the loop's framework (told from their text).
    if let Some(p) = TeacherPrompt::from_spec(&a.teacher_prompt)
        .with_context(|| format!("--teacher-prompt {}", a.teacher_prompt))?
    {
        p.check(a.framework)
            .with_context(|| format!("--teacher-prompt {}", a.teacher_prompt))?;
    }
    let mut skipped_questions = 0;
    let mut summary = if a.teacher == "gold" && a.framework == steper_runtime::Framework::SelfAsk {
        let mut t = GoldSelfAskTeacher::new();
        if let Some(s) = &a.fit_student {
            let cfg = steper_models::LlamaConfig::from_file(&s.join("config.json"))?;
            let tok = steper_models::load_tokenizer(&s.join("tokenizer.json"), cfg.vocab_size)?;
            t = t.with_budget(tok, cfg.max_position_embeddings);
        }
        // Questions without a usable decomposition are skipped and counted.
        let mut kept = Vec::with_capacity(qs.len());
        let mut first_skip = None;
        for q in &qs {
            match self_ask_hops(q) {
                Ok(_) => kept.push(q.clone()),
                Err(e) => {
                    t.stats_mut().skip(&e);
                    first_skip.get_or_insert_with(|| format!("{} ({e})", q.id));
                }
            }
        }
        skipped_questions = qs.len() - kept.len();
        if kept.is_empty() {
            bail!(
                "--teacher gold --framework self-ask: none of the {} questions of {} has a usable decomposition (MuSiQue's question_decomposition or 2Wiki's evidences; HotpotQA has none), e.g. {}: use an LLM teacher (checkpoint:DIR or openai:URL) for Self-Ask on this data, or --framework ircot",
                qs.len(),
                a.data.display(),
                first_skip.unwrap_or_default()
            );
        }
        let s = distill(
            &kept,
            &index,
            &mut t,
            |t, q| {
                // Every kept question has hops (checked above).
                t.set_example(q).ok();
            },
            &opts,
            &a.out,
            !a.json,
        )?;
        let stats = t.stats();
        steper_fsutil::write_atomic(
            &a.out.join("gold_stats.json"),
            serde_json::to_string_pretty(stats)?.as_bytes(),
        )?;
        if !a.json {
            eprintln!(
                "gold Self-Ask teacher: {} questions skipped ({} without a decomposition, {} referencing a missing sub-answer, {} incomplete); {} follow-ups, {} answered, {} unretrieved; {} answers, {} unknown",
                stats.skipped(), stats.skipped_no_decomposition, stats.skipped_missing_reference, stats.skipped_incomplete,
                stats.follow_ups, stats.answered_hops, stats.unretrieved_hops, stats.answers, stats.unknown_answers
            );
        }
        s
    } else if a.teacher == "gold" {
        let mut t = GoldTeacher::new();
        if let Some(s) = &a.fit_student {
            let cfg = steper_models::LlamaConfig::from_file(&s.join("config.json"))?;
            let tok = steper_models::load_tokenizer(&s.join("tokenizer.json"), cfg.vocab_size)?;
            t = t.with_budget(tok, cfg.max_position_embeddings);
        }
        let s = distill(
            &qs,
            &index,
            &mut t,
            |t, q| t.set_example(q),
            &opts,
            &a.out,
            !a.json,
        )?;
        // Counts cover the questions run now (a resumed run skips those already done).
        let stats = t.stats();
        steper_fsutil::write_atomic(
            &a.out.join("gold_stats.json"),
            serde_json::to_string_pretty(stats)?.as_bytes(),
        )?;
        if !a.json {
            eprintln!(
                "gold teacher steps: {} annotated, {} from decomposition, {} fallback, {} answers; {} out-of-range supporting_sentences indices skipped, {} annotated sentences cut from the prompt",
                stats.annotated_steps, stats.decomposition_steps, stats.fallback_steps, stats.answer_steps, stats.out_of_range_indices, stats.hidden_facts
            );
        }
        s
    } else if let Some(dir) = a.teacher.strip_prefix("checkpoint:") {
        let prompt = TeacherPrompt::from_spec(&a.teacher_prompt)
            .with_context(|| format!("--teacher-prompt {}", a.teacher_prompt))?;
        if prompt.is_some() && format == PromptFormat::Chat {
            bail!(
                "--teacher-prompt {} with --prompt-format chat and a checkpoint: teacher: the chat layout holds the student's prompt only (use --teacher-prompt none, or --prompt-format plain)",
                a.teacher_prompt
            );
        }
        // The teacher encodes prompts without adding special tokens, so the template's own
        // BOS text stays in.
        opts.loop_opts.prompt = PromptLayout::load(format, std::path::Path::new(dir))
            .with_context(|| format!("teacher checkpoint {dir}"))?;
        let device = a.device.open()?;
        let ck = steper_models::Checkpoint::load_with(std::path::Path::new(dir), a.dtype, &device)
            .with_context(|| format!("teacher checkpoint {dir}"))?;
        if let Some(note) = ck.dtype_note() {
            eprintln!("{note}");
        }
        let mut t = CandleTeacher::new(ck.model()?, ck.tokenizer()?, format!("checkpoint:{dir}"));
        if let Some(p) = prompt {
            t = t.with_prompt(p)?;
        }
        distill(&qs, &index, &mut t, |_, _| {}, &opts, &a.out, !a.json)?
    } else if let Some(url) = a.teacher.strip_prefix("openai:") {
        let t = openai_teacher(&a, url)?;
        let mut pool = vec![t; a.concurrency];
        let s = distill_pool(&qs, &index, &mut pool, |_, _| {}, &opts, &a.out, !a.json)?;
        let st = pool[0].stats();
        eprintln!(
            "{}: {} requests answered, {} retries",
            pool[0].endpoint(),
            st.ok.load(std::sync::atomic::Ordering::Relaxed),
            st.retries.load(std::sync::atomic::Ordering::Relaxed)
        );
        s
    } else {
        bail!(
            "--teacher must be `gold`, `checkpoint:DIR` or `openai:URL`, got {:?}",
            a.teacher
        );
    };
    if summary.prompt_format != format
        || summary.framework != a.framework
        || summary.skipped_questions != skipped_questions
    {
        // The loop's layout stays plain for the gold and OpenAI teachers (the server renders
        // the chat messages); the run's format is the one given.
        summary.prompt_format = format;
        summary.framework = a.framework;
        summary.skipped_questions = skipped_questions;
        write_summary(&a.out, &summary)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} questions, {} passed ({:.1}%), records init/expand/aggregate {}/{}/{}, vanilla {}, mean steps {:.2}, teacher {:.1} tok/s → {}",
            summary.questions, summary.passed, 100.0 * summary.pass_rate, summary.records[0], summary.records[1], summary.records[2],
            summary.vanilla_records, summary.mean_steps, summary.teacher_tokens_per_sec, a.out.display()
        );
    }
    Ok(())
}

fn openai_teacher(a: &Args, url: &str) -> Result<OpenAiTeacher> {
    let mut cfg = OpenAiConfig::new(url, a.teacher_model.clone());
    cfg.chat = prompt_format(a.prompt_format.as_deref(), a.teacher_chat)? == PromptFormat::Chat;
    cfg.api_key = std::env::var(&a.teacher_api_key_env)
        .ok()
        .filter(|k| !k.trim().is_empty());
    cfg.temperature = a.temperature;
    if !(a.timeout_secs.is_finite() && a.timeout_secs > 0.0) {
        bail!("--timeout-secs must be > 0, got {}", a.timeout_secs);
    }
    cfg.timeout = Duration::from_secs_f64(a.timeout_secs);
    cfg.max_retries = a.max_retries;
    cfg.context = a.teacher_context;
    cfg.prompt = TeacherPrompt::from_spec(&a.teacher_prompt)
        .with_context(|| format!("--teacher-prompt {}", a.teacher_prompt))?;
    let tokenizer = match &a.fit_student {
        Some(s) => {
            let cfg = steper_models::LlamaConfig::from_file(&s.join("config.json"))?;
            Some(steper_models::load_tokenizer(
                &s.join("tokenizer.json"),
                cfg.vocab_size,
            )?)
        }
        None => None,
    };
    Ok(OpenAiTeacher::new(cfg, tokenizer)?)
}

/// The run's prompt format: `--prompt-format` when given (`plain` contradicts
/// `--teacher-chat`), else chat exactly with `--teacher-chat`.
fn prompt_format(flag: Option<&str>, teacher_chat: bool) -> Result<PromptFormat> {
    let Some(flag) = flag else {
        return Ok(if teacher_chat {
            PromptFormat::Chat
        } else {
            PromptFormat::Plain
        });
    };
    let format = flag
        .parse::<PromptFormat>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if teacher_chat && format == PromptFormat::Plain {
        bail!("--prompt-format plain contradicts --teacher-chat (which sends /v1/chat/completions messages): drop one of them");
    }
    Ok(format)
}
