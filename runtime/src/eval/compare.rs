//! Paired comparison of evaluation runs on the same questions: per dataset and pooled, the
//! difference of each run from a baseline in EM, F1, Acc, forced share and steps, with paired
//! bootstrap intervals, and exact sign tests on EM and Acc ([`stats`]).
//!
//! A run is one [`EvalRecord`] file per dataset (what `steper-run eval --out` writes); every run
//! holds the same datasets in the same order, and each of its files the same question ids as the
//! baseline's (the first run's) file of that dataset. Questions are paired by id.

mod input;
mod markdown;
mod report;
pub mod stats;

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

pub use input::{read_runs, DatasetRecords, RunFiles, RunRecords};
pub use report::{Cell, Comparison, DatasetInfo, MetricDiff, RunComparison, SignTest};
pub use stats::{paired_bootstrap, sign_test_p, Interval};

use super::EvalRecord;
use crate::error::{Error, Result};
use input::too_few_runs;

/// Bootstrap resamples unless told otherwise.
pub const DEFAULT_RESAMPLES: usize = 10_000;
/// Coverage of the intervals unless told otherwise.
pub const DEFAULT_LEVEL: f64 = 0.95;
/// How many ids of a question-set difference an error names.
const IDS_NAMED: usize = 5;

/// A per-question metric of an [`EvalRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Exact match (0 or 1).
    Em,
    /// Token F1.
    F1,
    /// Gold contained in the prediction (0 or 1).
    Acc,
    /// Answered by forced aggregation (0 or 1).
    Forced,
    /// Steps run.
    Steps,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 5] = [
        Metric::Em,
        Metric::F1,
        Metric::Acc,
        Metric::Forced,
        Metric::Steps,
    ];

    /// The metric's value for one record.
    pub fn of(self, r: &EvalRecord) -> f64 {
        match self {
            Metric::Em => r.em,
            Metric::F1 => r.f1,
            Metric::Acc => r.acc,
            Metric::Forced => f64::from(u8::from(r.forced)),
            Metric::Steps => r.steps as f64,
        }
    }

    /// The name the report shows.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Em => "EM",
            Metric::F1 => "F1",
            Metric::Acc => "Acc",
            Metric::Forced => "forced",
            Metric::Steps => "steps",
        }
    }

    /// Whether the metric is a share of questions (every one but steps).
    pub fn is_share(self) -> bool {
        self != Metric::Steps
    }
}

/// How [`compare_runs`] computes its intervals, and what [`read_runs`] names the datasets.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareOptions {
    /// Bootstrap resamples (at least 1).
    pub resamples: usize,
    /// Seed of the resampling.
    pub seed: u64,
    /// Coverage of the intervals, in (0, 1).
    pub level: f64,
    /// Dataset names, one per file of a run; empty: the baseline's file names (without
    /// `.jsonl`).
    pub datasets: Vec<String>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            resamples: DEFAULT_RESAMPLES,
            seed: 0,
            level: DEFAULT_LEVEL,
            datasets: Vec::new(),
        }
    }
}

/// [`read_runs`] then [`compare_runs`].
pub fn compare_files(runs: &[RunFiles], opts: &CompareOptions) -> Result<Comparison> {
    if runs.len() < 2 {
        return Err(too_few_runs(runs.len()));
    }
    compare_runs(&read_runs(runs, &opts.datasets)?, opts)
}

/// Compares every run after the first with the first, per dataset and (with several datasets)
/// pooled. Refuses runs whose datasets differ from the baseline's in number or name, files
/// without records, duplicate ids, EM or Acc other than 0 / 1, and a file whose question ids
/// (or the question under an id) differ from the baseline's file of that dataset.
pub fn compare_runs(runs: &[RunRecords], opts: &CompareOptions) -> Result<Comparison> {
    let [base, others @ ..] = runs else {
        return Err(too_few_runs(0));
    };
    if others.is_empty() {
        return Err(too_few_runs(1));
    }
    if opts.resamples == 0 {
        return Err(Error::InvalidOption {
            option: "resamples".into(),
            expected: "at least 1".into(),
            got: "0".into(),
        });
    }
    if !(opts.level > 0.0 && opts.level < 1.0) {
        return Err(Error::InvalidOption {
            option: "level".into(),
            expected: "a coverage in (0, 1), e.g. 0.95".into(),
            got: opts.level.to_string(),
        });
    }
    let mut labels = HashSet::new();
    for run in runs {
        if !labels.insert(run.label.as_str()) {
            return Err(Error::InvalidOption {
                option: "runs".into(),
                expected: "a distinct label per run".into(),
                got: format!("{} twice", run.label),
            });
        }
        let names: Vec<&str> = run.datasets.iter().map(|d| d.name.as_str()).collect();
        let base_names: Vec<&str> = base.datasets.iter().map(|d| d.name.as_str()).collect();
        if names != base_names {
            return Err(Error::InvalidOption {
                option: format!("run {}", run.label),
                expected: format!("the baseline's datasets {}", base_names.join(",")),
                got: names.join(","),
            });
        }
        for d in &run.datasets {
            d.validate()?;
        }
    }
    let comparisons = others
        .iter()
        .map(|run| {
            let paired = base
                .datasets
                .iter()
                .zip(&run.datasets)
                .map(|(b, r)| Paired::of(b, r))
                .collect::<Result<Vec<_>>>()?;
            let datasets = base
                .datasets
                .iter()
                .zip(&paired)
                .map(|(b, p)| cell(&b.name, &[p], opts))
                .collect();
            let pooled = (paired.len() > 1)
                .then(|| cell("pooled", &paired.iter().collect::<Vec<_>>(), opts));
            Ok(RunComparison {
                run: run.label.clone(),
                datasets,
                pooled,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Comparison {
        baseline: base.label.clone(),
        runs: runs
            .iter()
            .map(|r| RunFiles {
                label: r.label.clone(),
                files: r.datasets.iter().map(|d| d.path.clone()).collect(),
            })
            .collect(),
        datasets: base
            .datasets
            .iter()
            .map(|d| DatasetInfo {
                name: d.name.clone(),
                questions: d.records.len(),
                baseline_file: d.path.clone(),
            })
            .collect(),
        resamples: opts.resamples,
        seed: opts.seed,
        level: opts.level,
        comparisons,
    })
}

const M: usize = Metric::ALL.len();

/// The paired questions of one dataset: per question the run's value minus the baseline's for
/// every metric, the sums of both, and the discordant pairs of EM and Acc.
struct Paired {
    diffs: Vec<[f64; M]>,
    baseline_sum: [f64; M],
    run_sum: [f64; M],
    em: (usize, usize),
    acc: (usize, usize),
}

impl Paired {
    /// Pairs `run`'s records with the baseline's by id (in the baseline's order).
    fn of(base: &DatasetRecords, run: &DatasetRecords) -> Result<Paired> {
        let by_id: HashMap<&str, usize> = run
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.as_str(), i))
            .collect();
        let base_ids: HashSet<&str> = base.records.iter().map(|r| r.id.as_str()).collect();
        let missing: Vec<&str> = base
            .records
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| !by_id.contains_key(id))
            .collect();
        let extra: Vec<&str> = run
            .records
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| !base_ids.contains(id))
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            let first = |ids: &[&str]| ids.iter().take(IDS_NAMED).map(|s| s.to_string()).collect();
            return Err(Error::QuestionSetsDiffer {
                path: run.path.clone(),
                baseline: base.path.clone(),
                missing: first(&missing),
                missing_count: missing.len(),
                extra: first(&extra),
                extra_count: extra.len(),
            });
        }
        let mut p = Paired {
            diffs: Vec::with_capacity(base.records.len()),
            baseline_sum: [0.0; M],
            run_sum: [0.0; M],
            em: (0, 0),
            acc: (0, 0),
        };
        for b in &base.records {
            let i = by_id[b.id.as_str()];
            let r = &run.records[i];
            if r.question != b.question {
                return Err(Error::QuestionMismatch {
                    path: run.path.clone(),
                    line: run.lines[i],
                    id: r.id.clone(),
                    baseline: base.path.clone(),
                });
            }
            let mut row = [0.0; M];
            for (k, m) in Metric::ALL.into_iter().enumerate() {
                let (bv, rv) = (m.of(b), m.of(r));
                p.baseline_sum[k] += bv;
                p.run_sum[k] += rv;
                row[k] = rv - bv;
            }
            p.diffs.push(row);
            for (count, bv, rv) in [(&mut p.em, b.em, r.em), (&mut p.acc, b.acc, r.acc)] {
                if bv > rv {
                    count.0 += 1;
                } else if rv > bv {
                    count.1 += 1;
                }
            }
        }
        Ok(p)
    }
}

/// The cell of the questions of `parts` (one dataset, or all of them pooled).
fn cell(dataset: &str, parts: &[&Paired], opts: &CompareOptions) -> Cell {
    let questions: usize = parts.iter().map(|p| p.diffs.len()).sum();
    let strata: Vec<&[[f64; M]]> = parts.iter().map(|p| p.diffs.as_slice()).collect();
    let intervals = paired_bootstrap(&strata, opts.resamples, opts.seed, opts.level);
    let n = questions.max(1) as f64;
    let metrics = Metric::ALL
        .into_iter()
        .enumerate()
        .map(|(k, metric)| {
            let baseline = parts.iter().map(|p| p.baseline_sum[k]).sum::<f64>() / n;
            let run = parts.iter().map(|p| p.run_sum[k]).sum::<f64>() / n;
            let difference = parts
                .iter()
                .flat_map(|p| p.diffs.iter().map(move |d| d[k]))
                .sum::<f64>()
                / n;
            MetricDiff {
                metric,
                baseline,
                run,
                difference,
                low: intervals[k].low,
                high: intervals[k].high,
            }
        })
        .collect();
    let total = |f: fn(&Paired) -> (usize, usize)| {
        parts
            .iter()
            .map(|p| f(p))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (em, acc) = (total(|p| p.em), total(|p| p.acc));
    Cell {
        dataset: dataset.to_string(),
        questions,
        metrics,
        em_sign_test: SignTest::of(em.0, em.1),
        acc_sign_test: SignTest::of(acc.0, acc.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Means and differences of a few values agree to rounding.
    const TOLERANCE: f64 = 1e-12;

    fn rec(id: &str, em: f64, f1: f64, acc: f64, steps: usize, forced: bool) -> EvalRecord {
        EvalRecord {
            id: id.into(),
            question: format!("question {id}?"),
            prediction: String::new(),
            golds: vec!["x".into()],
            em,
            f1,
            acc,
            steps,
            forced,
            new_tokens: 0,
            prefilled_tokens: 0,
            reused_tokens: 0,
            seconds: 0.0,
            error: None,
            trace: Vec::new(),
        }
    }

    fn run(label: &str, datasets: Vec<(&str, Vec<EvalRecord>)>) -> RunRecords {
        RunRecords {
            label: label.into(),
            datasets: datasets
                .into_iter()
                .map(|(name, records)| {
                    DatasetRecords::new(name, format!("{label}/{name}.jsonl"), records)
                })
                .collect(),
        }
    }

    fn opts(resamples: usize) -> CompareOptions {
        CompareOptions {
            resamples,
            ..CompareOptions::default()
        }
    }

    #[test]
    fn ten_discordant_pairs_one_way() -> Result<()> {
        // The run answers 10 questions exactly that the baseline misses; 5 both miss.
        let base: Vec<_> = (0..15)
            .map(|i| rec(&i.to_string(), 0.0, 0.0, 0.0, 2, true))
            .collect();
        let better: Vec<_> = (0..15)
            .map(|i| {
                let hit = if i < 10 { 1.0 } else { 0.0 };
                rec(&i.to_string(), hit, hit, hit, 3, false)
            })
            .rev()
            .collect();
        let c = compare_runs(
            &[run("a", vec![("d", base)]), run("b", vec![("d", better)])],
            &opts(200),
        )?;
        let cell = &c.comparisons[0].datasets[0];
        assert_eq!(cell.questions, 15);
        assert_eq!(
            (cell.em_sign_test.baseline_only, cell.em_sign_test.run_only),
            (0, 10)
        );
        assert!((cell.em_sign_test.p - 2.0 / 1024.0).abs() < TOLERANCE);
        assert_eq!(cell.acc_sign_test, cell.em_sign_test);
        let em = cell
            .metric(Metric::Em)
            .ok_or(Error::Internal("no EM".into()))?;
        assert!((em.difference - 10.0 / 15.0).abs() < TOLERANCE);
        assert!(em.low <= em.difference && em.difference <= em.high);
        // Every question: one step more and no forced aggregation: constant differences.
        let steps = cell
            .metric(Metric::Steps)
            .ok_or(Error::Internal("no steps".into()))?;
        assert_eq!((steps.difference, steps.low, steps.high), (1.0, 1.0, 1.0));
        assert_eq!((steps.baseline, steps.run), (2.0, 3.0));
        let forced = cell
            .metric(Metric::Forced)
            .ok_or(Error::Internal("no forced".into()))?;
        assert_eq!(
            (forced.difference, forced.low, forced.high),
            (-1.0, -1.0, -1.0)
        );
        assert!(c.comparisons[0].pooled.is_none());
        Ok(())
    }

    #[test]
    fn pooled_cell_sums_the_datasets() -> Result<()> {
        let a = run(
            "a",
            vec![
                (
                    "h",
                    vec![
                        rec("1", 1.0, 1.0, 1.0, 1, false),
                        rec("2", 0.0, 0.5, 1.0, 1, false),
                    ],
                ),
                ("m", vec![rec("1", 0.0, 0.0, 0.0, 4, true)]),
            ],
        );
        let b = run(
            "b",
            vec![
                (
                    "h",
                    vec![
                        rec("2", 1.0, 1.0, 1.0, 2, false),
                        rec("1", 0.0, 0.2, 0.0, 1, false),
                    ],
                ),
                ("m", vec![rec("1", 1.0, 1.0, 1.0, 4, false)]),
            ],
        );
        let c = compare_runs(&[a, b], &opts(100))?;
        let rc = &c.comparisons[0];
        let pooled = rc
            .pooled
            .as_ref()
            .ok_or(Error::Internal("no pooled".into()))?;
        assert_eq!((pooled.dataset.as_str(), pooled.questions), ("pooled", 3));
        let f1 = pooled
            .metric(Metric::F1)
            .ok_or(Error::Internal("no F1".into()))?;
        assert!((f1.baseline - 1.5 / 3.0).abs() < TOLERANCE);
        assert!((f1.run - 2.2 / 3.0).abs() < TOLERANCE);
        assert!((f1.difference - 0.7 / 3.0).abs() < TOLERANCE);
        assert_eq!(
            (
                pooled.em_sign_test.baseline_only,
                pooled.em_sign_test.run_only
            ),
            (1, 2)
        );
        assert_eq!(
            (
                pooled.acc_sign_test.baseline_only,
                pooled.acc_sign_test.run_only
            ),
            (1, 1)
        );
        assert_eq!(rc.datasets[1].em_sign_test.run_only, 1);
        let md = c.to_markdown();
        assert!(md.contains("### b − a"), "{md}");
        assert!(
            md.contains("| pooled | 3 | EM | 33.3 | 66.7 | +33.3 |"),
            "{md}"
        );
        assert!(md.contains("| steps | 2.00 | 2.33 | +0.33 |"), "{md}");
        Ok(())
    }

    #[test]
    fn differing_question_sets_name_the_missing_ids() {
        let base: Vec<_> = (0..20)
            .map(|i| rec(&format!("q{i}"), 0.0, 0.0, 0.0, 1, false))
            .collect();
        let mut short = base[..12].to_vec();
        short.push(rec("stray", 0.0, 0.0, 0.0, 1, false));
        let err = compare_runs(
            &[run("a", vec![("d", base)]), run("b", vec![("d", short)])],
            &opts(10),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.starts_with("b/d.jsonl: "), "{err}");
        assert!(err.contains("a/d.jsonl"), "{err}");
        assert!(
            err.contains("8 of the baseline's missing (q12, q13, q14, q15, q16, …)"),
            "{err}"
        );
        assert!(err.contains("1 not in the baseline (stray)"), "{err}");
    }

    #[test]
    fn other_question_under_an_id_names_the_line() {
        let base = vec![
            rec("1", 0.0, 0.0, 0.0, 1, false),
            rec("2", 0.0, 0.0, 0.0, 1, false),
        ];
        let mut other = base.clone();
        other[1].question = "something else?".into();
        let err = compare_runs(
            &[run("a", vec![("d", base)]), run("b", vec![("d", other)])],
            &opts(10),
        )
        .err();
        assert!(
            matches!(&err, Some(Error::QuestionMismatch { line: 2, id, .. }) if id == "2"),
            "{err:?}"
        );
    }

    #[test]
    fn bad_records_and_options_are_refused() {
        let good = vec![rec("1", 1.0, 1.0, 1.0, 1, false)];
        let check = |runs: &[RunRecords], o: &CompareOptions, want: &str| {
            let msg = compare_runs(runs, o)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        };
        let half_em = vec![rec("1", 0.5, 1.0, 1.0, 1, false)];
        check(
            &[
                run("a", vec![("d", good.clone())]),
                run("b", vec![("d", half_em)]),
            ],
            &opts(10),
            "b/d.jsonl: line 1: field `em`: expected 0 or 1, got 0.5",
        );
        let twice = vec![good[0].clone(), good[0].clone()];
        check(
            &[
                run("a", vec![("d", good.clone())]),
                run("b", vec![("d", twice)]),
            ],
            &opts(10),
            "`id`: \"1\" appears twice",
        );
        check(
            &[
                run("a", vec![("d", good.clone())]),
                run("b", vec![("d", Vec::new())]),
            ],
            &opts(10),
            "b/d.jsonl: no evaluation records",
        );
        check(
            &[
                run("a", vec![("d", good.clone())]),
                run("b", vec![("e", good.clone())]),
            ],
            &opts(10),
            "the baseline's datasets d",
        );
        check(
            &[
                run("a", vec![("d", good.clone())]),
                run("a", vec![("d", good.clone())]),
            ],
            &opts(10),
            "a distinct label per run",
        );
        check(
            &[run("a", vec![("d", good.clone())])],
            &opts(10),
            "at least 2",
        );
        check(
            &[
                run("a", vec![("d", good.clone())]),
                run("b", vec![("d", good.clone())]),
            ],
            &opts(0),
            "option resamples",
        );
    }
}
