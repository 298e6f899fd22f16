//! The embeddable API: an [`Engine`] holds one loaded model and one retriever and answers
//! questions with the multi-step loop.
//!
//! ```no_run
//! use steper_runtime::{BackendKind, Engine, OrtOptions};
//!
//! # fn main() -> steper_runtime::Result<()> {
//! let engine = Engine::builder()
//!     .model_dir("exports/student")
//!     .backend(BackendKind::Ort(OrtOptions::default()))
//!     .index("indexes/hotpotqa")
//!     .build()?;
//! let options = engine.default_options();
//! let reasoning = engine.reason("Who directed the film Kiss and Tell?", &options)?;
//! println!("{} ({} steps)", reasoning.answer, reasoning.steps.len());
//! # Ok(())
//! # }
//! ```
//!
//! # Threads
//!
//! `Engine` is `Send + Sync`. The model session and the index reader are shared by every call;
//! each [`Engine::reason`] call makes its own KV-cache [`crate::Sequence`], so calls from many
//! threads run at once without locks around the loop (the backend decides how a session runs
//! concurrent requests). Nothing is global: two engines in one process are independent.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

#[cfg(any(feature = "ort", feature = "tract"))]
use crate::backend::{load_model, BackendKind};
use crate::control::{Cancel, LoopControl, StepObserver};
use crate::error::{Error, Result};
use crate::generator::{Generator, GeneratorInfo};
use crate::manifest::Manifest;
use crate::prompt::{ChatTemplate, PromptFormat, PromptLayout};
use crate::reasoning::{
    reason_with, Decoding, GeneratorStepModel, LoopOptions, PromptLookup, PromptPrefix, Reasoning,
};
#[cfg(feature = "bm25")]
use crate::retrieval::Bm25Index;
use crate::retrieval::Retriever;

/// Per-call settings of [`Engine::reason`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReasonOptions {
    /// Loop settings (top-k, caps, steps, stop phrase).
    pub loop_options: LoopOptions,
    /// Keep the KV cache of the common prompt prefix between steps.
    pub kv_reuse: bool,
    /// Greedy (default) or sampling.
    pub decoding: Decoding,
    /// Text put before every step prompt (few-shot demonstrations, see
    /// [`crate::fewshot::prefix`]); the prompt is fitted into what the context leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_prefix: Option<String>,
    /// Prompt-lookup decoding (greedy only): drafts copied from the prompt, verified in one
    /// model call; the same tokens, fewer calls. Off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_lookup: Option<PromptLookup>,
    /// Stops the run from another thread or at a deadline ([`Error::Cancelled`] /
    /// [`Error::DeadlineExceeded`]); checked before every model call. Not serialized.
    #[serde(skip)]
    pub cancel: Option<Cancel>,
    /// Called with each step's trace as soon as the step finishes; it may stop the run. Not
    /// serialized.
    #[serde(skip)]
    pub observer: Option<StepObserver>,
}

impl ReasonOptions {
    /// Sets `loop_options`.
    #[must_use]
    pub fn with_loop_options(mut self, loop_options: LoopOptions) -> Self {
        self.loop_options = loop_options;
        self
    }

    /// Sets `kv_reuse`.
    #[must_use]
    pub fn with_kv_reuse(mut self, kv_reuse: bool) -> Self {
        self.kv_reuse = kv_reuse;
        self
    }

    /// Sets `decoding`.
    #[must_use]
    pub fn with_decoding(mut self, decoding: Decoding) -> Self {
        self.decoding = decoding;
        self
    }

    /// Sets `prompt_prefix`.
    #[must_use]
    pub fn with_prompt_prefix(mut self, prompt_prefix: impl Into<String>) -> Self {
        self.prompt_prefix = Some(prompt_prefix.into());
        self
    }

    /// Sets `prompt_lookup`.
    #[must_use]
    pub fn with_prompt_lookup(mut self, prompt_lookup: Option<PromptLookup>) -> Self {
        self.prompt_lookup = prompt_lookup;
        self
    }

    /// Sets `cancel`.
    #[must_use]
    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Sets `observer`.
    #[must_use]
    pub fn with_observer(mut self, observer: StepObserver) -> Self {
        self.observer = Some(observer);
        self
    }
}

impl Default for ReasonOptions {
    fn default() -> Self {
        ReasonOptions {
            loop_options: LoopOptions::default(),
            kv_reuse: true,
            decoding: Decoding::Greedy,
            prompt_prefix: None,
            prompt_lookup: None,
            cancel: None,
            observer: None,
        }
    }
}

/// Builds an [`Engine`]; everything is checked once, in [`EngineBuilder::build`].
#[derive(Default)]
pub struct EngineBuilder {
    #[cfg(any(feature = "ort", feature = "tract"))]
    model_dir: Option<PathBuf>,
    #[cfg(any(feature = "ort", feature = "tract"))]
    backend: Option<BackendKind>,
    #[cfg(feature = "bm25")]
    index: Option<PathBuf>,
    generator: Option<(Arc<dyn Generator>, Tokenizer, Vec<u32>)>,
    retriever: Option<Arc<dyn Retriever>>,
    loop_options: Option<LoopOptions>,
    chat_template: Option<ChatTemplate>,
    prompt_lookup: Option<PromptLookup>,
}

impl EngineBuilder {
    /// The chat template of `/v1/chat/completions` and of the `chat` prompt format, instead of
    /// the one in the model directory's `tokenizer_config.json`.
    #[must_use]
    pub fn chat_template(mut self, template: ChatTemplate) -> Self {
        self.chat_template = Some(template);
        self
    }

    /// The export directory (`steper.json`, `model.onnx`, `tokenizer.json`), run on
    /// [`EngineBuilder::backend`] (features `ort` / `tract`).
    #[cfg(any(feature = "ort", feature = "tract"))]
    #[must_use]
    pub fn model_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.model_dir = Some(dir.into());
        self
    }

    /// The backend that runs the export (default: [`BackendKind::default`], ONNX Runtime on
    /// CPU where compiled in).
    #[cfg(any(feature = "ort", feature = "tract"))]
    #[must_use]
    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.backend = Some(backend);
        self
    }

    /// The BM25 index directory written by `steper-run index` (feature `bm25`).
    #[cfg(feature = "bm25")]
    #[must_use]
    pub fn index(mut self, dir: impl Into<PathBuf>) -> Self {
        self.index = Some(dir.into());
        self
    }

    /// A generator made elsewhere instead of [`EngineBuilder::model_dir`] (tests, custom
    /// backends); `eos_token_ids` end a sentence.
    #[must_use]
    pub fn generator(
        mut self,
        generator: Arc<dyn Generator>,
        tokenizer: Tokenizer,
        eos_token_ids: &[u32],
    ) -> Self {
        self.generator = Some((generator, tokenizer, eos_token_ids.to_vec()));
        self
    }

    /// A retriever made elsewhere instead of [`EngineBuilder::index`].
    #[must_use]
    pub fn retriever(mut self, retriever: Arc<dyn Retriever>) -> Self {
        self.retriever = Some(retriever);
        self
    }

    /// Prompt-lookup decoding in [`Engine::default_options`] (default: off); checked in
    /// [`EngineBuilder::build`].
    #[must_use]
    pub fn prompt_lookup(mut self, lookup: PromptLookup) -> Self {
        self.prompt_lookup = Some(lookup);
        self
    }

    /// Loop settings for [`Engine::default_options`] (default: the manifest's, else docs/DESIGN.md's).
    #[must_use]
    pub fn loop_options(mut self, options: LoopOptions) -> Self {
        self.loop_options = Some(options);
        self
    }

    /// The generator: given, or loaded from the model directory.
    #[allow(clippy::type_complexity)]
    fn take_model(
        &mut self,
    ) -> Result<(
        Arc<dyn Generator>,
        Tokenizer,
        Vec<u32>,
        Option<Manifest>,
        Option<PathBuf>,
    )> {
        let which = |got: String| Error::InvalidOption {
            option: "model".into(),
            expected: "one of model_dir or generator".into(),
            got,
        };
        #[cfg(any(feature = "ort", feature = "tract"))]
        if let Some(dir) = self.model_dir.take() {
            if self.generator.is_some() {
                return Err(which(format!("both (model_dir {})", dir.display())));
            }
            let backend = self.backend.take().unwrap_or_default();
            let m = load_model(&dir, &backend)?;
            let eos = m.manifest.eos_token_ids.clone();
            return Ok((m.generator, m.tokenizer, eos, Some(m.manifest), Some(m.dir)));
        }
        match self.generator.take() {
            Some((g, t, eos)) => Ok((g, t, eos, None, None)),
            None => Err(which("neither".into())),
        }
    }

    /// The retriever: given, or the BM25 index opened.
    fn take_retriever(&mut self) -> Result<Arc<dyn Retriever>> {
        let which = |got: &str| Error::InvalidOption {
            option: "retriever".into(),
            expected: "one of index or retriever".into(),
            got: got.into(),
        };
        #[cfg(feature = "bm25")]
        if let Some(dir) = self.index.take() {
            if self.retriever.is_some() {
                return Err(which("both"));
            }
            return Ok(Arc::new(Bm25Index::open(&dir)?));
        }
        self.retriever.take().ok_or_else(|| which("neither"))
    }

    /// Loads the model and opens the index.
    pub fn build(mut self) -> Result<Engine> {
        let (generator, tokenizer, eos, manifest, model_dir) = self.take_model()?;
        let retriever = self.take_retriever()?;
        let chat_template = match (self.chat_template.take(), &model_dir) {
            (Some(t), _) => Some(t),
            (None, Some(dir)) => ChatTemplate::from_model_dir(dir, None)?,
            (None, None) => None,
        };
        let mut loop_options = self.loop_options.take().unwrap_or_else(|| {
            manifest
                .as_ref()
                .map(|m| LoopOptions::from(&m.loop_defaults))
                .unwrap_or_default()
        });
        // The manifest's prompt format, unless the caller chose a layout.
        let format = manifest
            .as_ref()
            .map(|m| m.prompt_format)
            .unwrap_or_default();
        if format == PromptFormat::Chat && loop_options.prompt.format() == PromptFormat::Plain {
            let template = chat_template.clone().ok_or_else(|| Error::ChatTemplate {
                path: model_dir.clone().unwrap_or_default(),
                line: None,
                message: "steper.json says `prompt_format: chat` but the model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)".into(),
            })?;
            // The loop encodes prompts with the tokenizer's special tokens: when it adds a BOS
            // itself, the template's own is left out (one BOS, as transformers' chat prompts).
            let adds_bos = tokenizer
                .encode("", true)
                .map(|e| !e.get_ids().is_empty())
                .unwrap_or(false);
            loop_options.prompt = PromptLayout::chat(template.with_leading_bos_stripped(adds_bos));
        }
        loop_options.validate()?;
        if let Some(pl) = &self.prompt_lookup {
            pl.validate()?;
        }
        Ok(Engine {
            chat_template,
            generator,
            tokenizer,
            eos,
            retriever,
            manifest,
            model_dir,
            loop_options,
            prompt_lookup: self.prompt_lookup,
            prefix: Mutex::new(None),
        })
    }
}

/// A loaded model and retriever, answering questions with the multi-step loop.
pub struct Engine {
    chat_template: Option<ChatTemplate>,
    generator: Arc<dyn Generator>,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    retriever: Arc<dyn Retriever>,
    manifest: Option<Manifest>,
    model_dir: Option<PathBuf>,
    loop_options: LoopOptions,
    prompt_lookup: Option<PromptLookup>,
    /// The last prompt prefix asked for, prefilled once (few-shot demonstrations are the same
    /// for every question of a run).
    prefix: Mutex<Option<Arc<PromptPrefix>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("generator", self.generator.info())
            .field("model_dir", &self.model_dir)
            .field("loop_options", &self.loop_options)
            .finish()
    }
}

impl Engine {
    /// A builder.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Options from the model's manifest (or the builder's loop options), greedy, KV reuse on,
    /// the builder's prompt lookup (off unless set).
    pub fn default_options(&self) -> ReasonOptions {
        ReasonOptions {
            loop_options: self.loop_options.clone(),
            prompt_lookup: self.prompt_lookup,
            ..ReasonOptions::default()
        }
    }

    /// The step model [`Engine::reason`] drives, with `options`' reuse, decoding and prompt
    /// prefix (prefilled on the first call that asks for it, then shared).
    pub(crate) fn step_model(&self, options: &ReasonOptions) -> Result<GeneratorStepModel<'_>> {
        let model = GeneratorStepModel::new(self.generator.as_ref(), &self.tokenizer, &self.eos)
            .with_kv_reuse(options.kv_reuse)
            .with_decoding(options.decoding)
            .with_prompt_lookup(options.prompt_lookup);
        Ok(match &options.prompt_prefix {
            Some(text) => model.with_prompt_prefix(self.prompt_prefix(text)?),
            None => model,
        })
    }

    /// The prefilled prompt prefix for `text`: the cached one when it is the same text, else a
    /// new one (computed under the lock, so concurrent callers prefill it once).
    fn prompt_prefix(&self, text: &str) -> Result<Arc<PromptPrefix>> {
        let mut cached = self.prefix.lock().map_err(|_| Error::Poisoned {
            what: "the engine's prompt prefix",
        })?;
        if let Some(p) = cached.as_ref().filter(|p| p.text() == text) {
            return Ok(Arc::clone(p));
        }
        let p = Arc::new(PromptPrefix::new(
            self.generator.as_ref(),
            &self.tokenizer,
            text,
        )?);
        *cached = Some(Arc::clone(&p));
        Ok(p)
    }

    /// Answers `question`; the result carries the per-step trace.
    pub fn reason(&self, question: &str, options: &ReasonOptions) -> Result<Reasoning> {
        let mut model = self.step_model(options)?;
        let control = LoopControl {
            cancel: options.cancel.clone(),
            observer: options.observer.clone(),
        };
        reason_with(
            question,
            self.retriever.as_ref(),
            &mut model,
            &options.loop_options,
            &control,
        )
    }

    /// What runs the model (backend, providers, context length).
    pub fn info(&self) -> &GeneratorInfo {
        self.generator.info()
    }

    /// The manifest, when loaded from a model directory.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// The model directory, when loaded from one.
    pub fn model_dir(&self) -> Option<&Path> {
        self.model_dir.as_deref()
    }

    /// The retriever.
    pub fn retriever(&self) -> &dyn Retriever {
        self.retriever.as_ref()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The generator that runs the model (for decoding rules other than the loop's, such as the
    /// HTTP service's completions).
    pub fn generator(&self) -> &dyn Generator {
        self.generator.as_ref()
    }

    /// Token ids that end a generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The model's chat template (from its directory or [`EngineBuilder::chat_template`]).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    /// A retriever that finds nothing.
    #[cfg(any(feature = "ort", feature = "tract"))]
    struct NoRetriever;

    #[cfg(any(feature = "ort", feature = "tract"))]
    impl Retriever for NoRetriever {
        fn retrieve(
            &self,
            _query: &str,
            _k: usize,
            _exclude: &std::collections::HashSet<String>,
        ) -> Result<Vec<crate::retrieval::Hit>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn engine_is_send_and_sync() {
        assert_send_sync::<Engine>();
    }

    #[test]
    fn build_reports_what_is_missing() {
        let e = Engine::builder().build();
        assert!(
            matches!(&e, Err(Error::InvalidOption { option, got, .. }) if option == "model" && got == "neither"),
            "{e:?}"
        );
        #[cfg(any(feature = "ort", feature = "tract"))]
        {
            let e = Engine::builder()
                .model_dir("/nonexistent/steper-model")
                .retriever(Arc::new(NoRetriever))
                .build();
            assert!(matches!(e, Err(Error::Model { .. })), "{e:?}");
        }
    }
}
