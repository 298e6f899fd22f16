//! The runs of a comparison: their record files as given on the command line
//! ([`RunFiles`]), and their records read and checked ([`RunRecords`], [`DatasetRecords`]).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{compress, RecordAt};
use crate::error::{Error, Result};
use crate::eval::EvalRecord;

/// The records of one run on one dataset.
#[derive(Debug, Clone)]
pub struct DatasetRecords {
    /// The dataset's name (the same in every run).
    pub name: String,
    /// The file the records came from (named by errors).
    pub path: PathBuf,
    /// The records.
    pub records: Vec<EvalRecord>,
    /// 1-based line of each record in `path`.
    pub(super) lines: Vec<usize>,
}

impl DatasetRecords {
    /// Records held in memory, as if record `i` were line `i + 1` of `path`.
    pub fn new(
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        records: Vec<EvalRecord>,
    ) -> Self {
        let lines = (1..=records.len()).collect();
        DatasetRecords {
            name: name.into(),
            path: path.into(),
            records,
            lines,
        }
    }

    /// Reads a record file (JSONL, plain, .gz or .zst; blank lines ignored). A malformed line
    /// is an [`Error::BadLine`] naming the file, the line and (through serde) the field.
    pub fn read(name: impl Into<String>, path: &Path) -> Result<Self> {
        let input = compress::open(path)?;
        let mut records = Vec::new();
        let mut lines = Vec::new();
        for (i, line) in input.lines().enumerate() {
            let line = line.map_err(|e| Error::io(path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let record = serde_json::from_str::<EvalRecord>(&line).map_err(|e| Error::BadLine {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })?;
            records.push(record);
            lines.push(i + 1);
        }
        Ok(DatasetRecords {
            name: name.into(),
            path: path.to_path_buf(),
            records,
            lines,
        })
    }

    /// Checks that there are records, that ids are unique and that EM and Acc are 0 or 1 and
    /// F1 in [0, 1].
    pub(super) fn validate(&self) -> Result<()> {
        if self.records.is_empty() {
            return Err(Error::NoRecords {
                path: self.path.clone(),
            });
        }
        let mut ids = HashSet::new();
        for (r, &line) in self.records.iter().zip(&self.lines) {
            if !ids.insert(r.id.as_str()) {
                return Err(Error::DuplicateId {
                    path: self.path.clone(),
                    id: r.id.clone(),
                });
            }
            let bad = |field: &str, expected: &'static str, got: f64| Error::BadField {
                path: self.path.clone(),
                at: RecordAt::Line(line),
                field: field.into(),
                expected,
                got: got.to_string(),
            };
            for (field, v) in [("em", r.em), ("acc", r.acc)] {
                if v != 0.0 && v != 1.0 {
                    return Err(bad(field, "0 or 1", v));
                }
            }
            if !(0.0..=1.0).contains(&r.f1) {
                return Err(bad("f1", "a number in [0, 1]", r.f1));
            }
        }
        Ok(())
    }
}

/// One run: its label and its records, one [`DatasetRecords`] per dataset.
#[derive(Debug, Clone)]
pub struct RunRecords {
    /// The run's name in the report.
    pub label: String,
    /// Its records per dataset, in the same order in every run.
    pub datasets: Vec<DatasetRecords>,
}

/// One run as files: its label and one record file per dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFiles {
    /// The run's name in the report.
    pub label: String,
    /// One record file per dataset.
    pub files: Vec<PathBuf>,
}

impl RunFiles {
    /// Parses runs written `[LABEL=]FILE[,FILE…]` (a label holds no `/`). A run without a label
    /// is named by its first file's name without `.jsonl` (and `.gz` / `.zst`); where two runs
    /// would get the same name, each of them is named by its files as written.
    pub fn parse_all(args: &[impl AsRef<str>]) -> Result<Vec<RunFiles>> {
        let mut runs = Vec::new();
        let mut named = Vec::new();
        for arg in args {
            let arg = arg.as_ref();
            let (label, files) = match arg.split_once('=') {
                Some((l, rest)) if !l.is_empty() && !l.contains(['/', '\\']) => (Some(l), rest),
                _ => (None, arg),
            };
            let files: Vec<PathBuf> = files.split(',').map(PathBuf::from).collect();
            if files.iter().any(|f| f.as_os_str().is_empty()) {
                return Err(Error::InvalidOption {
                    option: "run".into(),
                    expected: "[LABEL=]FILE[,FILE…]".into(),
                    got: arg.into(),
                });
            }
            named.push(label.is_some());
            runs.push(RunFiles {
                label: label.map_or_else(|| record_stem(&files[0]), str::to_string),
                files,
            });
        }
        let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
        for (run, named) in runs.iter_mut().zip(named) {
            if !named && labels.iter().filter(|l| **l == run.label).count() > 1 {
                run.label = files_text(&run.files);
            }
        }
        Ok(runs)
    }
}

/// A record file's name without its `.gz` / `.zst` and `.jsonl` / `.json` extensions.
fn record_stem(path: &Path) -> String {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let name = [".gz", ".zst"]
        .iter()
        .find_map(|e| name.strip_suffix(e))
        .unwrap_or(&name);
    let name = [".jsonl", ".json"]
        .iter()
        .find_map(|e| name.strip_suffix(e))
        .unwrap_or(name);
    name.to_string()
}

fn files_text(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads every run's files; dataset `i` is named `datasets[i]`, or by the baseline's `i`-th
/// file name when `datasets` is empty. Every run must give as many files as the baseline.
pub fn read_runs(runs: &[RunFiles], datasets: &[String]) -> Result<Vec<RunRecords>> {
    let Some(first) = runs.first() else {
        return Err(too_few_runs(0));
    };
    let n = first.files.len();
    let names: Vec<String> = if datasets.is_empty() {
        first.files.iter().map(|f| record_stem(f)).collect()
    } else {
        datasets.to_vec()
    };
    if names.len() != n {
        return Err(Error::InvalidOption {
            option: "datasets".into(),
            expected: format!("{n} names, one per file of a run"),
            got: names.join(","),
        });
    }
    if names.iter().collect::<HashSet<_>>().len() != n {
        return Err(Error::InvalidOption {
            option: "datasets".into(),
            expected: "a distinct name per dataset (name them with --datasets)".into(),
            got: names.join(","),
        });
    }
    runs.iter()
        .map(|run| {
            if run.files.len() != n {
                return Err(dataset_count(run, n, &first.label));
            }
            let datasets = run
                .files
                .iter()
                .zip(&names)
                .map(|(f, name)| DatasetRecords::read(name.clone(), f))
                .collect::<Result<_>>()?;
            Ok(RunRecords {
                label: run.label.clone(),
                datasets,
            })
        })
        .collect()
}

/// The error of fewer than two runs.
pub(super) fn too_few_runs(got: usize) -> Error {
    Error::InvalidOption {
        option: "runs".into(),
        expected: "at least 2 (a baseline, then the runs compared with it)".into(),
        got: got.to_string(),
    }
}

fn dataset_count(run: &RunFiles, n: usize, baseline: &str) -> Error {
    Error::InvalidOption {
        option: format!("run {}", run.label),
        expected: format!("{n} record file(s), one per dataset as for the baseline {baseline}"),
        got: files_text(&run.files),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_arguments_parse_labels_and_groups() -> Result<()> {
        let runs = RunFiles::parse_all(&[
            "out/plain/eval.jsonl",
            "chat=out/chat/h.jsonl.gz,out/chat/m.jsonl",
            "out/x/eval.jsonl",
            "dir/a=b.jsonl",
        ])?;
        assert_eq!(runs[0].label, "out/plain/eval.jsonl");
        assert_eq!(runs[1].label, "chat");
        assert_eq!(runs[1].files.len(), 2);
        assert_eq!(record_stem(&runs[1].files[0]), "h");
        assert_eq!(runs[2].label, "out/x/eval.jsonl");
        assert_eq!(runs[3].label, "a=b");
        assert_eq!(runs[3].files, vec![PathBuf::from("dir/a=b.jsonl")]);
        assert_eq!(
            RunFiles::parse_all(&["x/eval-plain.jsonl"])?[0].label,
            "eval-plain"
        );
        assert!(RunFiles::parse_all(&["a.jsonl,"]).is_err());
        Ok(())
    }
}
