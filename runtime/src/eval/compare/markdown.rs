//! The markdown form of a [`Comparison`].

use super::{Cell, Comparison};

impl Comparison {
    /// The comparison as markdown: a sentence saying how to read it, then per run a table of
    /// the metrics (shares in % of questions, differences in points) and a table of the sign
    /// tests.
    pub fn to_markdown(&self) -> String {
        let level = trim_number(self.level * 100.0);
        let base = cell_text(&self.baseline);
        let pooled = if self.datasets.len() > 1 {
            "; pooled: each dataset resampled within itself"
        } else {
            ""
        };
        let mut out = format!(
            "Baseline **{base}**; differences are run − baseline over the same questions, \
             paired by id; {level} % intervals from {} paired bootstrap resamples of the \
             questions (seed {}{pooled}). EM, F1, Acc and forced are % of questions \
             (differences in points); steps are per question.\n",
            self.resamples, self.seed
        );
        for c in &self.comparisons {
            let run = cell_text(&c.run);
            out.push_str(&format!(
                "\n### {run} − {base}\n\n\
                 | dataset | questions | metric | {base} | {run} | difference | {level} % interval |\n\
                 |---|---:|---|---:|---:|---:|---|\n"
            ));
            let cells: Vec<&Cell> = c.datasets.iter().chain(&c.pooled).collect();
            for cell in &cells {
                for (i, m) in cell.metrics.iter().enumerate() {
                    let (name, n) = if i == 0 {
                        (cell_text(&cell.dataset), cell.questions.to_string())
                    } else {
                        (String::new(), String::new())
                    };
                    let (scale, digits) = if m.metric.is_share() {
                        (100.0, 1)
                    } else {
                        (1.0, 2)
                    };
                    let v = |x: f64| format!("{:.*}", digits, x * scale);
                    let d = |x: f64| signed(x * scale, digits);
                    out.push_str(&format!(
                        "| {name} | {n} | {} | {} | {} | {} | [{}, {}] |\n",
                        m.metric.label(),
                        v(m.baseline),
                        v(m.run),
                        d(m.difference),
                        d(m.low),
                        d(m.high)
                    ));
                }
            }
            out.push_str(&format!(
                "\n| dataset | EM: only {base} | EM: only {run} | EM: sign test p | \
                 Acc: only {base} | Acc: only {run} | Acc: sign test p |\n\
                 |---|---:|---:|---:|---:|---:|---:|\n"
            ));
            for cell in &cells {
                let (e, a) = (cell.em_sign_test, cell.acc_sign_test);
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} |\n",
                    cell_text(&cell.dataset),
                    e.baseline_only,
                    e.run_only,
                    p_text(e.p),
                    a.baseline_only,
                    a.run_only,
                    p_text(a.p)
                ));
            }
        }
        out
    }
}

/// A value with its sign (`+0.0` for zero).
fn signed(x: f64, digits: usize) -> String {
    let s = format!("{:.*}", digits, x);
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        format!("+{}", &s[1..])
    } else if s.starts_with('-') {
        s
    } else {
        format!("+{s}")
    }
}

/// A p value: three decimals, or two significant digits below 0.001.
fn p_text(p: f64) -> String {
    if p < 1e-3 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// A number without a trailing `.0`.
fn trim_number(x: f64) -> String {
    let s = format!("{x:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}

/// Text safe inside a markdown table cell.
fn cell_text(s: &str) -> String {
    s.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_the_markdown() {
        assert_eq!(signed(-0.0001, 1), "+0.0");
        assert_eq!(signed(-1.26, 1), "-1.3");
        assert_eq!(signed(2.0, 2), "+2.00");
        assert_eq!(p_text(2.0 / 1024.0), "0.002");
        assert_eq!(p_text(1e-5), "1.0e-5");
        assert_eq!(trim_number(95.0), "95");
        assert_eq!(trim_number(97.5), "97.5");
    }
}
