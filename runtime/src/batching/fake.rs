//! A fake language model with a real batched step, for the tests of the batched evaluation
//! and of the server's batching workers.

use std::sync::Arc;

use crate::backend::{append_single, fork_single, truncate_single};
use crate::backend::{BatchCache, BatchDecoder, BatchInput};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generator::{Generator, GeneratorInfo, Logits, LogitsMode, Sequence};
use crate::reasoning::tests::{loop_tokenizer, ListRetriever};

/// Logit of the token the fake picks, over 0 for the rest.
pub(crate) const FAKE_MARGIN: f32 = 4.0;

/// Columns of a fake batch cache: per row, the token of each position (`None`: padding
/// written by `pad_front` or a dummy row's position).
struct Rows(Vec<Vec<Option<u32>>>);

/// A fake LM with a real batched step: the next token of a row is a hash of the row's
/// visible tokens (attention mask 1), and every call checks that the visible positions
/// are real tokens and that each new token's RoPE position is the count of visible tokens
/// before it. A driver that shows a stale or padding position, hides a real one or gives
/// a wrong position fails or generates other text.
pub(crate) struct BatchHashLm {
    pub(crate) info: GeneratorInfo,
    pub(crate) words: Vec<u32>,
    pub(crate) period: u32,
    pub(crate) eos: u32,
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

    fn step(&self, cache: &mut BatchCache, input: &BatchInput, mode: LogitsMode) -> Result<Logits> {
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

    fn select_rows(&self, cache: &BatchCache, rows: &[Option<usize>]) -> Result<BatchCache> {
        crate::backend::check_select(cache, rows)?;
        let have = &cache
            .inner
            .downcast_ref::<Rows>()
            .ok_or(Error::ForeignSequence)?
            .0;
        let picked = rows
            .iter()
            .map(|r| match r {
                Some(r) => have[*r].clone(),
                None => vec![None; cache.past],
            })
            .collect();
        Ok(BatchCache {
            batch: rows.len(),
            past: cache.past,
            inner: Box::new(Rows(picked)),
        })
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

/// An engine on [`BatchHashLm`] over the loop tests' tokenizer and a list retriever of 30
/// passages.
pub(crate) fn engine() -> Result<Engine> {
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
