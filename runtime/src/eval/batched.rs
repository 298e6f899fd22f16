//! Batched evaluation: up to `batch` questions run through the loop at once. Each question has
//! its own [`LoopRun`], step model and KV cache (prefill and cross-step reuse stay per
//! sequence, as in [`crate::Engine::reason`]); the decode steps of every question that is
//! generating run as one batched model call on a persistent batch cache. A question that
//! finishes frees its slot for the next one.
//!
//! The batch cache is left-padded: row `r` holds its sequence's positions right-aligned, the
//! attention mask hides the positions before them, and RoPE positions count the row's own
//! tokens. When a slot starts a step its prompt's cache is copied into its row once
//! ([`BatchDecoder::place_row`]); the other rows are not touched. The whole cache is re-laid
//! only when a prompt is longer than the batch cache ([`BatchDecoder::pad_front`], with
//! [`GROW_HEADROOM`] spare positions) or when every row has more than [`TRIM_SLACK`] padding
//! positions in front ([`BatchDecoder::trim_front`]).

use std::time::Instant;

use crate::backend::{BatchCache, BatchDecoder, BatchInput};
use crate::data::QaExample;
use crate::engine::{Engine, ReasonOptions};
use crate::error::{Error, Result};
use crate::generator::{LogitsMode, Sequence};
use crate::reasoning::{GeneratorStepModel, LoopRun, Reasoning, StepDecode};

/// Spare positions added in front of the batch cache when a prompt does not fit it, so that
/// the next slightly longer prompts fit without another re-layout.
pub const GROW_HEADROOM: usize = 64;
/// Padding positions every row may have in front before the batch cache is trimmed.
pub const TRIM_SLACK: usize = 128;

/// A question in a slot.
struct Slot<'e> {
    /// Index of the question.
    q: usize,
    started: Instant,
    run: LoopRun,
    model: GeneratorStepModel<'e>,
    /// While the slot's step is generating: its state, its sequence (the prompt's cache) and
    /// the token to run at the next batched call.
    decoding: Option<(StepDecode, Sequence, u32)>,
}

/// What a slot did when asked to start its next step.
enum Started {
    /// It generates: its row is in the batch cache, its first token pending.
    Decoding,
    /// The question is over.
    Done(Result<Reasoning>),
}

/// The batch cache and what each row holds.
struct Batch<'d> {
    dec: &'d dyn BatchDecoder,
    cache: BatchCache,
    /// Real (right-aligned) positions of each row.
    lens: Vec<usize>,
}

impl Batch<'_> {
    /// Copies `seq`'s cache into row `r` (growing the batch cache when it is too short).
    fn place(&mut self, r: usize, seq: &Sequence) -> Result<()> {
        let src = seq
            .cache
            .downcast_ref::<BatchCache>()
            .ok_or(Error::ForeignSequence)?;
        if src.past > self.cache.past {
            let grow = src.past - self.cache.past + GROW_HEADROOM;
            self.dec.pad_front(&mut self.cache, grow)?;
        }
        self.dec.place_row(&mut self.cache, r, src)?;
        self.lens[r] = src.past;
        Ok(())
    }

    /// One batched decode call: `tokens[r]` for the generating rows, `None` for idle ones
    /// (they attend only to their own dummy token). Returns the last-position logits per row.
    fn step(&mut self, tokens: &[Option<u32>]) -> Result<crate::generator::Logits> {
        let past = self.cache.past;
        let b = tokens.len();
        let mut input_ids = Vec::with_capacity(b);
        let mut position_ids = Vec::with_capacity(b);
        let mut attention_mask = Vec::with_capacity(b * (past + 1));
        for (r, t) in tokens.iter().enumerate() {
            match t {
                Some(id) => {
                    let len = self.lens[r];
                    input_ids.push(i64::from(*id));
                    position_ids.push(len as i64);
                    attention_mask.extend((0..past).map(|c| i64::from(c >= past - len)));
                    self.lens[r] = len + 1;
                }
                None => {
                    input_ids.push(0);
                    position_ids.push(0);
                    attention_mask.extend(std::iter::repeat_n(0, past));
                    self.lens[r] = 0;
                }
            }
            attention_mask.push(1);
        }
        let input = BatchInput {
            batch: b,
            seq: 1,
            input_ids,
            attention_mask,
            position_ids,
        };
        let logits = self.dec.step(&mut self.cache, &input, LogitsMode::Last)?;
        // Drop the front columns that are padding in every generating row.
        let common = tokens
            .iter()
            .zip(&self.lens)
            .filter(|(t, _)| t.is_some())
            .map(|(_, &len)| self.cache.past - len)
            .min()
            .unwrap_or(0);
        if common > TRIM_SLACK {
            self.dec.trim_front(&mut self.cache, common)?;
        }
        Ok(logits)
    }
}

/// Answers `examples` with up to `batch` questions at once; the results are in question order,
/// each with its wall time (from when its slot took it to its answer). A question whose loop
/// fails gets its error; errors of the batched calls themselves stop the run.
pub(crate) fn answer_batched(
    engine: &Engine,
    examples: &[QaExample],
    options: &ReasonOptions,
    batch: usize,
    mut done: impl FnMut(usize, Result<Reasoning>, f64) -> Result<()>,
) -> Result<()> {
    if batch == 0 {
        return Err(Error::InvalidOption {
            option: "batch".into(),
            expected: "at least 1".into(),
            got: "0".into(),
        });
    }
    let dec = engine
        .generator()
        .batch_decoder()
        .ok_or_else(|| Error::InvalidOption {
            option: "batch".into(),
            expected: "1 for a generator without a batched step (only the ONNX backends have one, and not for a GroupQueryAttention export, which cannot mask left-padded rows)"
                .into(),
            got: batch.to_string(),
        })?;
    let b = batch.min(examples.len()).max(1);
    let mut state = Batch {
        dec,
        cache: dec.new_cache(b)?,
        lens: vec![0; b],
    };
    let mut slots: Vec<Option<Slot<'_>>> = (0..b).map(|_| None).collect();
    let mut next = 0;
    loop {
        // Every slot either generates or is empty (no question left).
        for (r, entry) in slots.iter_mut().enumerate() {
            while entry.as_ref().is_none_or(|s| s.decoding.is_none()) {
                if entry.is_none() {
                    if next == examples.len() {
                        break;
                    }
                    let q = next;
                    next += 1;
                    let run = engine.step_model(options).and_then(|mut model| {
                        use crate::reasoning::StepModel;
                        let run = LoopRun::new(&examples[q].question, &options.loop_options)?;
                        model.begin_question(&examples[q].question)?;
                        Ok((run, model))
                    });
                    match run {
                        Ok((run, model)) => {
                            *entry = Some(Slot {
                                q,
                                started: Instant::now(),
                                run,
                                model,
                                decoding: None,
                            })
                        }
                        Err(e) => done(q, Err(e), 0.0)?,
                    }
                    continue;
                }
                let slot = entry
                    .as_mut()
                    .ok_or_else(|| Error::Internal("empty slot".into()))?;
                match start_step(engine, slot, &mut state, r) {
                    Ok(Started::Decoding) => {}
                    Ok(Started::Done(result)) => {
                        let (q, t) = (slot.q, slot.started.elapsed().as_secs_f64());
                        *entry = None;
                        done(q, result, t)?;
                    }
                    Err(e) => {
                        let (q, t) = (slot.q, slot.started.elapsed().as_secs_f64());
                        *entry = None;
                        done(q, Err(e), t)?;
                    }
                }
            }
        }
        let tokens: Vec<Option<u32>> = slots
            .iter()
            .map(|s| s.as_ref().and_then(|s| s.decoding.as_ref()).map(|d| d.2))
            .collect();
        if tokens.iter().all(Option::is_none) {
            return Ok(());
        }
        let logits = state.step(&tokens)?;
        for (r, entry) in slots.iter_mut().enumerate() {
            let Some(slot) = entry.as_mut() else { continue };
            let Some((mut d, seq, _)) = slot.decoding.take() else {
                continue;
            };
            let outcome = match slot.model.accept(&mut d, logits.row(r)) {
                Ok(Some(id)) => {
                    slot.decoding = Some((d, seq, id));
                    continue;
                }
                Ok(None) => {
                    let out = slot.model.finish(d, seq);
                    slot.run.finish_step(out)
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(None) => {} // the next step starts at the top of the loop
                Ok(Some(reasoning)) => {
                    let (q, t) = (slot.q, slot.started.elapsed().as_secs_f64());
                    *entry = None;
                    done(q, Ok(reasoning), t)?;
                }
                Err(e) => {
                    let (q, t) = (slot.q, slot.started.elapsed().as_secs_f64());
                    *entry = None;
                    done(q, Err(e), t)?;
                }
            }
        }
    }
}

/// Runs the slot's steps until one generates (its row placed, first token pending) or the
/// question is answered.
fn start_step(
    engine: &Engine,
    slot: &mut Slot<'_>,
    batch: &mut Batch<'_>,
    row: usize,
) -> Result<Started> {
    loop {
        slot.run.prepare(engine.retriever(), &slot.model)?;
        let req = slot.run.request()?;
        let (mut d, seq, logits) = slot.model.prefill(&req)?;
        match slot.model.accept(&mut d, logits.last())? {
            Some(id) => {
                debug_assert_eq!(seq.len(), d.prompt_tokens());
                batch.place(row, &seq)?;
                slot.decoding = Some((d, seq, id));
                return Ok(Started::Decoding);
            }
            None => {
                let out = slot.model.finish(d, seq);
                if let Some(r) = slot.run.finish_step(out)? {
                    return Ok(Started::Done(Ok(r)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::{append_single, fork_single, truncate_single};
    use crate::engine::Engine;
    use crate::eval::{evaluate, evaluate_batched, EvalOptions};
    use crate::generator::{Generator, GeneratorInfo, Logits};
    use crate::reasoning::tests::{loop_tokenizer, ListRetriever};

    /// Logit of the token the fake picks, over 0 for the rest.
    const FAKE_MARGIN: f32 = 4.0;

    /// Columns of a fake batch cache: per row, the token of each position (`None`: padding
    /// written by `pad_front` or a dummy row's position).
    struct Rows(Vec<Vec<Option<u32>>>);

    /// A fake LM with a real batched step: the next token of a row is a hash of the row's
    /// visible tokens (attention mask 1), and every call checks that the visible positions
    /// are real tokens and that each new token's RoPE position is the count of visible tokens
    /// before it. A driver that shows a stale or padding position, hides a real one or gives
    /// a wrong position fails or generates other text.
    struct BatchHashLm {
        info: GeneratorInfo,
        words: Vec<u32>,
        period: u32,
        eos: u32,
    }

    impl BatchHashLm {
        fn next(&self, visible: &[u32]) -> u32 {
            if visible.last() == Some(&self.period) {
                return self.eos;
            }
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &t in &visible[visible.len().saturating_sub(6)..] {
                h = (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3);
            }
            if h.is_multiple_of(5) {
                self.period
            } else {
                self.words[(h / 5) as usize % self.words.len()]
            }
        }

        fn rows<'c>(&self, cache: &'c mut BatchCache) -> Result<&'c mut Vec<Vec<Option<u32>>>> {
            Ok(&mut cache
                .inner
                .downcast_mut::<Rows>()
                .ok_or(Error::ForeignSequence)?
                .0)
        }
    }

    impl BatchDecoder for BatchHashLm {
        fn new_cache(&self, batch: usize) -> Result<BatchCache> {
            Ok(BatchCache {
                batch,
                past: 0,
                inner: Box::new(Rows(vec![Vec::new(); batch])),
            })
        }

        fn step(
            &self,
            cache: &mut BatchCache,
            input: &BatchInput,
            mode: LogitsMode,
        ) -> Result<Logits> {
            input.check(cache.past, cache.batch)?;
            let (past, s, vocab) = (cache.past, input.seq, self.info.vocab_size);
            let rows = self.rows(cache)?;
            let mut data = Vec::new();
            for (r, row) in rows.iter_mut().enumerate() {
                let mask = &input.attention_mask[r * (past + s)..(r + 1) * (past + s)];
                let mut visible = Vec::new();
                for (c, m) in mask[..past].iter().enumerate() {
                    if *m == 1 {
                        visible.push(row[c].ok_or_else(|| {
                            Error::Internal(format!("row {r}: position {c} is padding but visible"))
                        })?);
                    }
                }
                for j in 0..s {
                    let id = input.input_ids[r * s + j] as u32;
                    let visible_new = mask[past + j] == 1;
                    if visible_new {
                        let pos = input.position_ids[r * s + j];
                        if pos != visible.len() as i64 {
                            return Err(Error::Internal(format!(
                                "row {r}: position id {pos}, {} visible tokens before it",
                                visible.len()
                            )));
                        }
                        visible.push(id);
                    }
                    row.push(visible_new.then_some(id));
                    if mode == LogitsMode::All || j + 1 == s {
                        let mut l = vec![0.0f32; vocab];
                        l[self.next(&visible) as usize % vocab] = FAKE_MARGIN;
                        data.extend(l);
                    }
                }
            }
            cache.past += s;
            let n = data.len() / vocab;
            Ok(Logits {
                rows: n,
                vocab,
                data,
            })
        }

        fn truncate_cache(&self, cache: &mut BatchCache, len: usize) -> Result<()> {
            let len = len.min(cache.past);
            for row in self.rows(cache)? {
                row.truncate(len);
            }
            cache.past = len;
            Ok(())
        }

        fn copy_cache(&self, cache: &BatchCache, len: usize) -> Result<BatchCache> {
            let len = len.min(cache.past);
            let rows = &cache
                .inner
                .downcast_ref::<Rows>()
                .ok_or(Error::ForeignSequence)?
                .0;
            Ok(BatchCache {
                batch: cache.batch,
                past: len,
                inner: Box::new(Rows(rows.iter().map(|r| r[..len].to_vec()).collect())),
            })
        }

        fn pad_front(&self, cache: &mut BatchCache, n: usize) -> Result<()> {
            for row in self.rows(cache)? {
                row.splice(0..0, std::iter::repeat_n(None, n));
            }
            cache.past += n;
            Ok(())
        }

        fn trim_front(&self, cache: &mut BatchCache, n: usize) -> Result<()> {
            if n > cache.past {
                return Err(Error::Internal("trim past the cache".into()));
            }
            for row in self.rows(cache)? {
                row.drain(..n);
            }
            cache.past -= n;
            Ok(())
        }

        fn place_row(&self, dst: &mut BatchCache, row: usize, src: &BatchCache) -> Result<()> {
            crate::backend::check_place(dst, row, src)?;
            let from = src
                .inner
                .downcast_ref::<Rows>()
                .ok_or(Error::ForeignSequence)?
                .0[0]
                .clone();
            let dp = dst.past;
            let to = &mut self.rows(dst)?[row];
            to[dp - from.len()..].copy_from_slice(&from);
            Ok(())
        }
    }

    impl Generator for BatchHashLm {
        fn info(&self) -> &GeneratorInfo {
            &self.info
        }
        fn new_sequence(&self) -> Result<Sequence> {
            Ok(Sequence::new(Box::new(self.new_cache(1)?)))
        }
        fn append(&self, seq: &mut Sequence, tokens: &[u32], mode: LogitsMode) -> Result<Logits> {
            append_single(self, self.info.context_length, seq, tokens, mode)
        }
        fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()> {
            truncate_single(self, seq, len)
        }
        fn fork(&self, seq: &Sequence, len: usize) -> Result<Sequence> {
            fork_single(self, seq, len)
        }
        fn batch_decoder(&self) -> Option<&dyn BatchDecoder> {
            Some(self)
        }
    }

    fn question(i: usize) -> QaExample {
        QaExample {
            id: format!("q{i}"),
            dataset: "t".into(),
            question: format!("Which doc {} of {} ?", i % 7, (i * 3) % 11),
            answers: vec![format!("{i}")],
            kind: None,
            paragraphs: Vec::new(),
            supporting_titles: None,
            extra: Default::default(),
        }
    }

    fn engine() -> Result<Engine> {
        let tok = loop_tokenizer()?;
        let id = |w: &str| tok.token_to_id(w).ok_or_else(|| Error::Tokenizer(w.into()));
        let lm = BatchHashLm {
            info: GeneratorInfo::new("batch-hash-lm", tok.get_vocab_size(true), 4096)
                .with_providers(["CPU"]),
            words: ["text", "doc", "1", "2", "3", "of", "Title", "7"]
                .iter()
                .map(|w| id(w))
                .collect::<Result<_>>()?,
            period: id(".")?,
            eos: id("[EOS]")?,
        };
        let eos = lm.eos;
        Engine::builder()
            .generator(Arc::new(lm), tok, &[eos])
            .retriever(Arc::new(ListRetriever::new(30)))
            .build()
    }

    #[test]
    fn batched_answers_and_traces_equal_one_at_a_time() -> Result<()> {
        let engine = engine()?;
        let qs: Vec<QaExample> = (0..10).map(question).collect();
        let options = engine.default_options();
        let opts = EvalOptions::default();
        let (_, seq) = evaluate(&engine, &qs, &options, &opts, None)?;
        assert!(seq.iter().all(|r| r.error.is_none()), "{seq:?}");
        let lengths: std::collections::HashSet<Vec<usize>> = seq
            .iter()
            .map(|r| r.trace.iter().map(|s| s.new_tokens).collect())
            .collect();
        assert!(
            lengths.len() > 3,
            "the fake's sentences should differ in length between questions: {lengths:?}"
        );
        for batch in [2, 3, 4, 16] {
            let (s, bat) = evaluate_batched(&engine, &qs, &options, &opts, None, batch)?;
            assert_eq!(s.questions, qs.len());
            for (a, b) in seq.iter().zip(&bat) {
                assert_eq!(b.error, None, "batch {batch}, {}", a.id);
                assert_eq!(a.id, b.id);
                assert_eq!(a.prediction, b.prediction, "batch {batch}, {}", a.id);
                let sa: Vec<_> = a
                    .trace
                    .iter()
                    .map(|s| (&s.sentence, s.new_tokens, s.prompt_tokens))
                    .collect();
                let sb: Vec<_> = b
                    .trace
                    .iter()
                    .map(|s| (&s.sentence, s.new_tokens, s.prompt_tokens))
                    .collect();
                assert_eq!(sa, sb, "batch {batch}, {}", a.id);
            }
        }
        Ok(())
    }

    /// Few-shot demonstrations before every prompt: the batched rows start from copies of the
    /// prefix's cache and answer as one question at a time does, on one thread or two.
    #[test]
    fn batched_answers_with_a_prompt_prefix_equal_one_at_a_time() -> Result<()> {
        let engine = engine()?;
        let qs: Vec<QaExample> = (0..8).map(question).collect();
        let mut options = engine.default_options();
        options.prompt_prefix =
            Some("Wikipedia Title : doc 7\ntext of doc 7 .\n\nQ : Which doc ?\nA : So the answer is 7 .\n\n".into());
        let opts = EvalOptions::default();
        let (_, one) = evaluate(&engine, &qs, &options, &opts, None)?;
        assert!(one.iter().all(|r| r.error.is_none()), "{one:?}");
        let mut plain = engine.default_options();
        plain.kv_reuse = false;
        plain.prompt_prefix = options.prompt_prefix.clone();
        let (_, recomputed) = evaluate(&engine, &qs, &plain, &opts, None)?;
        let runs = [
            ("reuse off", recomputed),
            (
                "batch 3",
                evaluate_batched(&engine, &qs, &options, &opts, None, 3)?.1,
            ),
            (
                "batch 2, 2 workers",
                crate::eval::evaluate_parallel(&engine, &qs, &options, &opts, None, 2, 2)?.1,
            ),
        ];
        for (what, run) in runs {
            for (a, b) in one.iter().zip(&run) {
                assert_eq!(b.error, None, "{what}, {}", a.id);
                assert_eq!(a.prediction, b.prediction, "{what}, {}", a.id);
                let sa: Vec<_> = a
                    .trace
                    .iter()
                    .map(|s| (&s.sentence, s.prompt_tokens))
                    .collect();
                let sb: Vec<_> = b
                    .trace
                    .iter()
                    .map(|s| (&s.sentence, s.prompt_tokens))
                    .collect();
                assert_eq!(sa, sb, "{what}, {}", a.id);
            }
        }
        Ok(())
    }

    #[test]
    fn the_batch_cache_is_trimmed_when_every_row_has_front_padding() -> Result<()> {
        let lm = BatchHashLm {
            info: GeneratorInfo::new("batch-hash-lm", 50, 4096),
            words: vec![3, 4, 5],
            period: 1,
            eos: 2,
        };
        let mut b = Batch {
            dec: &lm,
            cache: lm.new_cache(2)?,
            lens: vec![0; 2],
        };
        let mut long = lm.new_sequence()?;
        lm.append(&mut long, &[7; 400], LogitsMode::Last)?;
        b.place(0, &long)?;
        assert_eq!(b.cache.past, 400 + GROW_HEADROOM);
        let mut short = lm.new_sequence()?;
        lm.append(&mut short, &[8; 10], LogitsMode::Last)?;
        b.place(1, &short)?;
        b.step(&[Some(3), Some(4)])?;
        assert_eq!(
            b.cache.past,
            401 + GROW_HEADROOM,
            "row 0 still needs its 400 positions"
        );
        // Row 0 replaced by a short prompt: every row now has > TRIM_SLACK front padding.
        b.place(0, &short)?;
        b.step(&[Some(3), Some(4)])?;
        assert_eq!(b.cache.past, 12, "trimmed to the longest row");
        assert_eq!(b.lens, vec![11, 12]);
        b.step(&[Some(5), None])?;
        assert_eq!(b.lens, vec![12, 0], "an idle row keeps nothing");
        Ok(())
    }
}
