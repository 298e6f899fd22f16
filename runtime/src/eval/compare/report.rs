//! What a comparison reports: per run, per dataset and pooled, a [`Cell`] of metric
//! differences and sign tests.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::input::RunFiles;
use super::stats::sign_test_p;
use super::Metric;

/// A metric of one run against the baseline on a set of questions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricDiff {
    /// The metric.
    pub metric: Metric,
    /// The baseline's mean.
    pub baseline: f64,
    /// The run's mean.
    pub run: f64,
    /// `run − baseline` (the mean of the paired differences).
    pub difference: f64,
    /// Lower end of the bootstrap interval of the difference.
    pub low: f64,
    /// Upper end of the bootstrap interval of the difference.
    pub high: f64,
}

/// The exact sign test of a binary metric over the questions where the two runs disagree.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SignTest {
    /// Questions only the baseline gets right.
    pub baseline_only: usize,
    /// Questions only the run gets right.
    pub run_only: usize,
    /// Two-sided exact p ([`sign_test_p`]).
    pub p: f64,
}

impl SignTest {
    pub(super) fn of(baseline_only: usize, run_only: usize) -> Self {
        SignTest {
            baseline_only,
            run_only,
            p: sign_test_p(baseline_only, run_only),
        }
    }
}

/// One run against the baseline on one dataset (or pooled over all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// The dataset, or `pooled`.
    pub dataset: String,
    /// Paired questions.
    pub questions: usize,
    /// One entry per [`Metric::ALL`], in that order.
    pub metrics: Vec<MetricDiff>,
    /// The sign test on EM.
    pub em_sign_test: SignTest,
    /// The sign test on Acc.
    pub acc_sign_test: SignTest,
}

impl Cell {
    /// The entry of `metric`.
    pub fn metric(&self, metric: Metric) -> Option<&MetricDiff> {
        self.metrics.iter().find(|m| m.metric == metric)
    }
}

/// One run against the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunComparison {
    /// The run's label.
    pub run: String,
    /// Per dataset, in the runs' order.
    pub datasets: Vec<Cell>,
    /// All questions of all datasets (each dataset resampled within itself); only when there
    /// are several datasets.
    pub pooled: Option<Cell>,
}

/// A dataset of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Its name.
    pub name: String,
    /// Its questions.
    pub questions: usize,
    /// The baseline's file of it.
    pub baseline_file: PathBuf,
}

/// Every run after the first against the first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The baseline's label.
    pub baseline: String,
    /// Every run (the baseline first) with its record files.
    pub runs: Vec<RunFiles>,
    /// The datasets.
    pub datasets: Vec<DatasetInfo>,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// Seed of the resampling.
    pub seed: u64,
    /// Coverage of the intervals.
    pub level: f64,
    /// One entry per run after the baseline.
    pub comparisons: Vec<RunComparison>,
}
