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

/// The batch cache and what each row holds. Callers address *slots* (a fixed number, one per
/// sequence they may run at once); the cache holds a row only for the slots in use, so a
/// half-empty batch costs what its sequences cost: a slot gets a row when its first prompt is
/// placed, and the rows of slots that stopped generating are dropped before the next call
/// ([`BatchDecoder::select_rows`]).
pub(crate) struct Batch<'d> {
    dec: &'d dyn BatchDecoder,
    /// `None` while no slot holds a row.
    pub(crate) cache: Option<BatchCache>,
    /// The row of each slot.
    row_of: Vec<Option<usize>>,
    /// The slot of each row.
    slot_of: Vec<usize>,
    /// Real (right-aligned) positions of each row.
    pub(crate) lens: Vec<usize>,
}

/// The last-position logits of a batched call, by slot.
#[derive(Debug)]
pub(crate) struct SlotLogits {
    logits: Logits,
    row_of: Vec<Option<usize>>,
}

impl SlotLogits {
    /// The logits of `slot` (empty for a slot that did not generate).
    pub(crate) fn row(&self, slot: usize) -> &[f32] {
        match self.row_of.get(slot).copied().flatten() {
            Some(r) => self.logits.row(r),
            None => &[],
        }
    }
}

impl<'d> Batch<'d> {
    /// An empty batch for up to `slots` sequences.
    pub(crate) fn new(dec: &'d dyn BatchDecoder, slots: usize) -> Result<Self> {
        Ok(Batch {
            dec,
            cache: None,
            row_of: vec![None; slots],
            slot_of: Vec::new(),
            lens: Vec::new(),
        })
    }

    /// Rows the cache holds.
    pub(crate) fn rows(&self) -> usize {
        self.slot_of.len()
    }

    /// Re-lays the cache as `keep` (old rows, or `None` for a new empty row) for `slots`.
    fn reshape(&mut self, keep: &[Option<usize>], slots: Vec<usize>) -> Result<()> {
        let lens = keep.iter().map(|r| r.map_or(0, |r| self.lens[r])).collect();
        self.cache = match (self.cache.take(), keep.is_empty()) {
            (_, true) => None,
            (None, false) => Some(self.dec.new_cache(keep.len())?),
            (Some(c), false) => Some(self.dec.select_rows(&c, keep)?),
        };
        self.row_of.iter_mut().for_each(|r| *r = None);
        for (row, &slot) in slots.iter().enumerate() {
            self.row_of[slot] = Some(row);
        }
        self.slot_of = slots;
        self.lens = lens;
        Ok(())
    }

    /// Copies `seq`'s cache into `slot`'s row (adding the row, or growing the batch cache when
    /// the prompt is longer than it).
    pub(crate) fn place(&mut self, slot: usize, seq: &Sequence) -> Result<()> {
        let src = seq
            .cache
            .downcast_ref::<BatchCache>()
            .ok_or(Error::ForeignSequence)?;
        let row = match self.row_of.get(slot) {
            Some(Some(r)) => *r,
            Some(None) => {
                let mut keep: Vec<Option<usize>> = (0..self.rows()).map(Some).collect();
                keep.push(None);
                let mut slots = self.slot_of.clone();
                slots.push(slot);
                self.reshape(&keep, slots)?;
                self.rows() - 1
            }
            None => {
                return Err(Error::Misuse {
                    call: "Batch::place",
                    problem: format!("slot {slot} of {}", self.row_of.len()),
                })
            }
        };
        let cache = self.cache.as_mut().ok_or(Error::ForeignSequence)?;
        if src.past > cache.past {
            let grow = src.past - cache.past + GROW_HEADROOM;
            self.dec.pad_front(cache, grow)?;
        }
        self.dec.place_row(cache, row, src)?;
        self.lens[row] = src.past;
        Ok(())
    }

    /// One batched decode call: `tokens[slot]` for the generating slots (each placed before);
    /// the rows of the others are dropped first. Returns the last-position logits by slot.
    pub(crate) fn step(&mut self, tokens: &[Option<u32>]) -> Result<SlotLogits> {
        let idle = |slot: usize| tokens.get(slot).is_none_or(Option::is_none);
        if self.slot_of.iter().any(|&s| idle(s)) {
            let kept: Vec<(usize, usize)> = self
                .slot_of
                .iter()
                .enumerate()
                .filter(|(_, &s)| !idle(s))
                .map(|(r, &s)| (r, s))
                .collect();
            let keep: Vec<Option<usize>> = kept.iter().map(|(r, _)| Some(*r)).collect();
            self.reshape(&keep, kept.into_iter().map(|(_, s)| s).collect())?;
        }
        for (slot, t) in tokens.iter().enumerate() {
            if t.is_some() && self.row_of[slot].is_none() {
                return Err(Error::Misuse {
                    call: "Batch::step",
                    problem: format!("slot {slot} generates but holds no row (never placed)"),
                });
            }
        }
        let cache = self.cache.as_mut().ok_or_else(|| Error::Misuse {
            call: "Batch::step",
            problem: "no slot generates".into(),
        })?;
        let (past, b) = (cache.past, self.slot_of.len());
        let mut input_ids = Vec::with_capacity(b);
        let mut position_ids = Vec::with_capacity(b);
        let mut attention_mask = Vec::with_capacity(b * (past + 1));
        for (r, &slot) in self.slot_of.iter().enumerate() {
            let id = tokens[slot].ok_or_else(|| Error::Internal("idle row kept".into()))?;
            let len = self.lens[r];
            input_ids.push(i64::from(id));
            position_ids.push(len as i64);
            attention_mask.extend((0..past).map(|c| i64::from(c >= past - len)));
            attention_mask.push(1);
            self.lens[r] = len + 1;
        }
        let input = BatchInput {
            batch: b,
            seq: 1,
            input_ids,
            attention_mask,
            position_ids,
        };
        let logits = self.dec.step(cache, &input, LogitsMode::Last)?;
        // Drop the front columns that are padding in every row.
        let common = self
            .lens
            .iter()
            .map(|&len| cache.past - len)
            .min()
            .unwrap_or(0);
        if common > TRIM_SLACK {
            self.dec.trim_front(cache, common)?;
        }
        Ok(SlotLogits {
            logits,
            row_of: self.row_of.clone(),
        })
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
        if options.prompt_lookup.is_some() {
            return Err(Error::InvalidOption {
                option: "prompt_lookup".into(),
                expected:
                    "none in a batched loop (its step decodes one token per sequence and call)"
                        .into(),
                got: "a prompt-lookup setting".into(),
            });
        }
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

    fn past(b: &Batch<'_>) -> usize {
        b.cache.as_ref().map_or(0, |c| c.past())
    }

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
        assert_eq!(past(&b), 400 + GROW_HEADROOM);
        let mut short = lm.new_sequence()?;
        lm.append(&mut short, &[8; 10], LogitsMode::Last)?;
        b.place(1, &short)?;
        b.step(&[Some(3), Some(4)])?;
        assert_eq!(
            past(&b),
            401 + GROW_HEADROOM,
            "row 0 still needs its 400 positions"
        );
        // Row 0 replaced by a short prompt: every row now has > TRIM_SLACK front padding.
        b.place(0, &short)?;
        b.step(&[Some(3), Some(4)])?;
        assert_eq!(past(&b), 12, "trimmed to the longest row");
        assert_eq!(b.lens, vec![11, 12]);
        Ok(())
    }

    #[test]
    fn rows_follow_the_slots_in_use() -> Result<()> {
        let lm = BatchHashLm {
            info: GeneratorInfo::new("batch-hash-lm", 50, 4096),
            words: vec![3, 4, 5],
            period: 1,
            eos: 2,
        };
        let mut b = Batch::new(&lm, 3)?;
        let seq = |n: usize, t: u32| -> Result<Sequence> {
            let mut s = lm.new_sequence()?;
            lm.append(&mut s, &vec![t; n], LogitsMode::Last)?;
            Ok(s)
        };
        assert_eq!(b.rows(), 0);
        b.place(2, &seq(5, 7)?)?;
        b.place(0, &seq(3, 8)?)?;
        assert_eq!(b.rows(), 2, "a row per placed slot, none for slot 1");
        let l = b.step(&[Some(3), None, Some(4)])?;
        assert!(l.row(1).is_empty());
        assert_eq!((l.row(0).len(), l.row(2).len()), (50, 50));
        // Slot 2 stops: its row is dropped, slot 0 keeps its positions.
        let l = b.step(&[Some(5), None, None])?;
        assert_eq!(b.rows(), 1);
        assert_eq!(b.lens, vec![5]);
        assert_eq!(l.row(0).len(), 50);
        // Slot 1 joins into a new row; every slot stops: no row left.
        b.place(1, &seq(4, 9)?)?;
        assert_eq!(b.rows(), 2);
        b.step(&[Some(3), Some(3), None])?;
        b.step(&[None, None, None]).expect_err("nothing generates");
        assert_eq!(b.rows(), 0);
        assert!(b.cache.is_none());
        Ok(())
    }
}
