//! Progress on stderr for long library work (indexing, retrieval, evaluation): an indicatif bar
//! with the `progress` feature, nothing without it (the work is the same either way).

/// A progress bar, hidden when not asked for or when the crate is built without `progress`.
pub(crate) struct Progress {
    #[cfg(feature = "progress")]
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A bar of `len` steps labelled `what`, drawn on stderr only when `show` is true.
    #[cfg_attr(not(feature = "progress"), allow(unused_variables))]
    pub(crate) fn new(show: bool, len: u64, what: &str) -> Progress {
        #[cfg(feature = "progress")]
        {
            if !show {
                return Progress {
                    bar: indicatif::ProgressBar::hidden(),
                };
            }
            let bar = indicatif::ProgressBar::new(len);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_string());
            Progress { bar }
        }
        #[cfg(not(feature = "progress"))]
        Progress {}
    }

    /// Advances by `n` steps.
    #[cfg_attr(not(feature = "progress"), allow(unused_variables))]
    pub(crate) fn inc(&self, n: u64) {
        #[cfg(feature = "progress")]
        self.bar.inc(n);
    }

    /// Removes the bar.
    pub(crate) fn finish_and_clear(&self) {
        #[cfg(feature = "progress")]
        self.bar.finish_and_clear();
    }
}
