//! Continuous batching shared by batched evaluation ([`crate::eval::batched`]) and the server's
//! batching workers ([`crate::serve`]): a persistent left-padded batch cache whose rows are
//! filled and freed as sequences come and go ([`Batch`]), and the loop of one question driven
//! one decode token at a time from outside ([`LoopSlot`]).
//!
//! The batch cache is left-padded: row `r` holds its sequence's positions right-aligned, the
//! attention mask hides the positions before them, and RoPE positions count the row's own
//! tokens. When a sequence joins, its prompt's cache is copied into its row once
//! ([`BatchDecoder::place_row`]); the other rows are not touched. The whole cache is re-laid
//! only when a prompt is longer than the batch cache ([`BatchDecoder::pad_front`], with
//! [`GROW_HEADROOM`] spare positions) or when every row has more than [`TRIM_SLACK`] padding
//! positions in front ([`BatchDecoder::trim_front`]).

#[cfg(test)]
pub(crate) mod fake;

use crate::backend::{BatchCache, BatchDecoder, BatchInput};
use crate::control::LoopControl;
use crate::engine::{Engine, ReasonOptions};
use crate::error::{Error, Result};
use crate::generator::{Logits, LogitsMode, Sequence};
use crate::reasoning::{finish_and_report, GeneratorStepModel, LoopRun, Reasoning, StepDecode};

/// Spare positions added in front of the batch cache when a prompt does not fit it, so that
/// the next slightly longer prompts fit without another re-layout.
pub const GROW_HEADROOM: usize = 64;
/// Padding positions every row may have in front before the batch cache is trimmed.
pub const TRIM_SLACK: usize = 128;

/// The batch cache and what each row holds.
pub(crate) struct Batch<'d> {
    dec: &'d dyn BatchDecoder,
    pub(crate) cache: BatchCache,
    /// Real (right-aligned) positions of each row.
    pub(crate) lens: Vec<usize>,
}

impl<'d> Batch<'d> {
    /// An empty batch cache of `rows` rows.
    pub(crate) fn new(dec: &'d dyn BatchDecoder, rows: usize) -> Result<Self> {
        Ok(Batch {
            dec,
            cache: dec.new_cache(rows)?,
            lens: vec![0; rows],
        })
    }

    /// Copies `seq`'s cache into row `r` (growing the batch cache when it is too short).
    pub(crate) fn place(&mut self, r: usize, seq: &Sequence) -> Result<()> {
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
    pub(crate) fn step(&mut self, tokens: &[Option<u32>]) -> Result<Logits> {
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

/// Where a [`LoopSlot`] stands after it was advanced.
pub(crate) enum Advance {
    /// Its step generates: its row is in the batch cache, its next token pending
    /// ([`LoopSlot::next_token`]).
    Decoding,
    /// The question is answered.
    Done(Box<Reasoning>),
}

/// One question's loop with its own step model (prefill and cross-step KV reuse stay per
/// sequence, as in [`Engine::reason`]) whose decode tokens run in a shared [`Batch`] row.
/// Cancellation and the step observer behave as in [`Engine::reason`].
pub(crate) struct LoopSlot<'e> {
    run: LoopRun,
    model: GeneratorStepModel<'e>,
    control: LoopControl,
    /// While a step generates: its state, its sequence (the prompt's cache) and the token to
    /// run at the next batched call.
    decoding: Option<(StepDecode, Sequence, u32)>,
}

impl<'e> LoopSlot<'e> {
    /// The loop for `question` under `options` (its cancel token and observer included).
    pub(crate) fn new(engine: &'e Engine, question: &str, options: &ReasonOptions) -> Result<Self> {
        use crate::reasoning::StepModel;
        let mut model = engine.step_model(options)?;
        let run =
            LoopRun::new(question, &options.loop_options)?.with_cancel(options.cancel.clone());
        model.begin_question(question)?;
        Ok(LoopSlot {
            run,
            model,
            control: LoopControl {
                cancel: options.cancel.clone(),
                observer: options.observer.clone(),
            },
            decoding: None,
        })
    }

    /// The token the slot's row runs at the next batched call, while a step generates.
    pub(crate) fn next_token(&self) -> Option<u32> {
        self.decoding.as_ref().map(|d| d.2)
    }

    /// Runs the slot's steps until one generates (its prompt placed in `row`, first token
    /// pending) or the question is answered.
    pub(crate) fn start(
        &mut self,
        engine: &Engine,
        batch: &mut Batch<'_>,
        row: usize,
    ) -> Result<Advance> {
        loop {
            self.control.check()?;
            self.run.prepare(engine.retriever(), &self.model)?;
            let req = self.run.request()?;
            let (mut d, seq, logits) = self.model.prefill(&req)?;
            match self.model.accept(&mut d, logits.last())? {
                Some(id) => {
                    debug_assert_eq!(seq.len(), d.prompt_tokens());
                    batch.place(row, &seq)?;
                    self.decoding = Some((d, seq, id));
                    return Ok(Advance::Decoding);
                }
                None => {
                    let out = self.model.finish(d, seq);
                    if let Some(r) = finish_and_report(&mut self.run, out, &self.control)? {
                        return Ok(Advance::Done(Box::new(r)));
                    }
                }
            }
        }
    }

    /// Takes the logits of the slot's row after a batched call: the step goes on, or it ends
    /// and the next one starts (in `row`), or the question is answered.
    pub(crate) fn accept(
        &mut self,
        engine: &Engine,
        batch: &mut Batch<'_>,
        row: usize,
        logits: &[f32],
    ) -> Result<Advance> {
        let (mut d, seq, _) = self.decoding.take().ok_or_else(|| Error::Misuse {
            call: "LoopSlot::accept",
            problem: "the slot has no step generating".into(),
        })?;
        if let Some(id) = self.model.accept(&mut d, logits)? {
            self.decoding = Some((d, seq, id));
            return Ok(Advance::Decoding);
        }
        let out = self.model.finish(d, seq);
        match finish_and_report(&mut self.run, out, &self.control)? {
            Some(r) => Ok(Advance::Done(Box::new(r))),
            None => self.start(engine, batch, row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::BatchHashLm;
    use super::*;
    use crate::generator::{Generator, GeneratorInfo};

    #[test]
    fn the_batch_cache_is_trimmed_when_every_row_has_front_padding() -> Result<()> {
        let lm = BatchHashLm {
            info: GeneratorInfo::new("batch-hash-lm", 50, 4096),
            words: vec![3, 4, 5],
            period: 1,
            eos: 2,
        };
        let mut b = Batch::new(&lm, 2)?;
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
