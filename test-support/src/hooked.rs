//! A generator that forwards every call to the one it wraps and lets a test see (or hold back)
//! the model calls and cache cuts on the way: [`Hooked`] with a [`CallHook`]. [`CallCounter`]
//! counts them; a test that decides when model calls may run implements its own hook.
//!
//! The wrapper has no batched step ([`Generator::batch_decoder`] is `None`): the calls of a
//! batched decoder would not pass the hook.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use steper_runtime::{Generator, GeneratorInfo, Logits, LogitsMode, Result, Sequence};

/// What runs before the wrapped generator's calls. Both methods do nothing by default.
pub trait CallHook: Send + Sync {
    /// Before a model call over `tokens` (an `append`).
    fn on_append(&self, _tokens: &[u32]) {}

    /// Before a sequence holding `from` positions is cut to `to` (only when `to < from`).
    fn on_cut(&self, _from: usize, _to: usize) {}
}

impl<H: CallHook + ?Sized> CallHook for Arc<H> {
    fn on_append(&self, tokens: &[u32]) {
        (**self).on_append(tokens);
    }
    fn on_cut(&self, from: usize, to: usize) {
        (**self).on_cut(from, to);
    }
}

/// `inner` with `hook` run before its model calls and cache cuts.
pub struct Hooked<H> {
    inner: Arc<dyn Generator>,
    /// The hook (public so a test can read what it recorded).
    pub hook: H,
}

impl<H: CallHook> Hooked<H> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Generator>, hook: H) -> Self {
        Hooked { inner, hook }
    }
}

impl<H: CallHook> Generator for Hooked<H> {
    fn info(&self) -> &GeneratorInfo {
        self.inner.info()
    }
    fn new_sequence(&self) -> Result<Sequence> {
        self.inner.new_sequence()
    }
    fn append(&self, seq: &mut Sequence, tokens: &[u32], mode: LogitsMode) -> Result<Logits> {
        self.hook.on_append(tokens);
        self.inner.append(seq, tokens, mode)
    }
    fn truncate(&self, seq: &mut Sequence, len: usize) -> Result<()> {
        if len < seq.len() {
            self.hook.on_cut(seq.len(), len);
        }
        self.inner.truncate(seq, len)
    }
    fn fork(&self, seq: &Sequence, len: usize) -> Result<Sequence> {
        self.inner.fork(seq, len)
    }
}

/// Counts model calls and cache cuts.
#[derive(Debug, Default)]
pub struct CallCounter {
    calls: AtomicUsize,
    cuts: AtomicUsize,
}

impl CallCounter {
    /// (model calls, cache cuts) since the last take.
    pub fn take(&self) -> (usize, usize) {
        (
            self.calls.swap(0, Ordering::SeqCst),
            self.cuts.swap(0, Ordering::SeqCst),
        )
    }
}

impl CallHook for CallCounter {
    fn on_append(&self, _tokens: &[u32]) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
    fn on_cut(&self, _from: usize, _to: usize) {
        self.cuts.fetch_add(1, Ordering::SeqCst);
    }
}
