//! Figures and how they are written: one row per figure (ours, qemu-ga's,
//! the ratio), and free-form detail tables, rendered as Markdown.

use std::fmt::Write as _;
use std::time::Duration;

/// Which way is better for a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
    /// Not a speed or a size (a description): no ratio.
    Neither,
}

/// One side's figure: a number for the ratio and the text shown.
#[derive(Debug, Clone, Default)]
pub struct Fig {
    pub value: Option<f64>,
    pub text: String,
}

impl Fig {
    pub fn new(value: f64, text: impl Into<String>) -> Self {
        Self {
            value: Some(value),
            text: text.into(),
        }
    }
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            value: None,
            text: text.into(),
        }
    }
    pub fn time(d: Duration) -> Self {
        Self::new(d.as_secs_f64(), fmt_time(d))
    }
    pub fn rate(per_second: f64, unit: &str) -> Self {
        Self::new(per_second, format!("{} {unit}", fmt_num(per_second)))
    }
    pub fn mib(kib: u64) -> Self {
        Self::new(kib as f64, format!("{:.1} MiB", kib as f64 / 1024.0))
    }
}

/// A figure of both agents.
#[derive(Debug, Clone)]
pub struct Row {
    pub figure: String,
    pub ours: Fig,
    pub qga: Fig,
    pub better: Better,
}

/// Everything one run found.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Detail sections, in order: (title, Markdown).
    pub details: Vec<(String, String)>,
    /// Lines of the "run" section.
    pub run: Vec<String>,
    /// Named figures for the targets table (see [`Report::targets`]).
    pub values: Vec<(&'static str, f64)>,
}

impl Report {
    pub fn row(&mut self, figure: impl Into<String>, ours: Fig, qga: Fig, better: Better) {
        let row = Row {
            figure: figure.into(),
            ours,
            qga,
            better,
        };
        println!(
            "bench: {:<55} ours {:<28} qemu-ga {:<28} {}",
            row.figure,
            row.ours.text,
            row.qga.text,
            ratio_text(&row).1
        );
        self.rows.push(row);
    }

    /// Keep a figure under a name, for the targets table.
    pub fn value(&mut self, name: &'static str, v: f64) {
        self.values.push((name, v));
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// Where each target of issue 10 stands in this run.
    fn targets(&self) -> String {
        let mut out = String::from("| target | this run | met |\n|---|---|---|\n");
        let mut line = |target: &str, now: Option<String>, met: Option<bool>| {
            let _ = writeln!(
                out,
                "| {target} | {} | {} |",
                now.unwrap_or_else(|| "not measured".into()),
                match met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "–",
                }
            );
        };
        let ratio = |a: &str, b: &str| Some(self.get(a)? / self.get(b)?);
        let r = ratio("ping_p50_qga", "ping_p50_ours");
        line(
            "ping p50 no worse than qemu-ga's",
            r.map(|r| format!("qemu-ga's ÷ ours = {r:.2}")),
            r.map(|r| r >= 1.0),
        );
        for (what, ours, qga, want) in [
            (
                "pipelined requests/s at least 5× qemu-ga's",
                "pipelined_ours",
                "pipelined_qga",
                5.0,
            ),
            (
                "file read at least 10× qemu-ga's",
                "read_ours",
                "read_qga",
                10.0,
            ),
            (
                "file write at least 10× qemu-ga's",
                "write_ours",
                "write_qga",
                10.0,
            ),
        ] {
            let r = ratio(ours, qga);
            line(what, r.map(|r| format!("{r:.1}×")), r.map(|r| r >= want));
        }
        let peak = self.get("peak_rss_ours_kib");
        line(
            "peak RSS under 32 MB during a 256 MiB transfer (best chunk size)",
            peak.map(|k| format!("{:.1} MB", k * 1024.0 / 1e6)),
            peak.map(|k| k * 1024.0 < 32e6),
        );
        let idle = self.get("idle_rss_ours_kib");
        line(
            "idle RSS under 4 MB",
            idle.map(|k| format!("{:.1} MB", k * 1024.0 / 1e6)),
            idle.map(|k| k * 1024.0 < 4e6),
        );
        let start = self.get("startup_ours_s");
        line(
            "start-up under 2 ms",
            start.map(|s| fmt_time(Duration::from_secs_f64(s))),
            start.map(|s| s < 2e-3),
        );
        out
    }

    pub fn detail(&mut self, title: impl Into<String>, markdown: String) {
        self.details.push((title.into(), markdown));
    }

    /// The Markdown written between the markers of docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("### The run\n\n");
        for line in &self.run {
            let _ = writeln!(out, "- {line}");
        }
        out.push_str("\n### Side by side\n\n");
        out.push_str(
            "\"ratio\" is ours ÷ qemu-ga's; \"better\" names the agent with the better figure \
             and by how many times.\n\n",
        );
        out.push_str("| figure | ours | qemu-ga | ratio | better |\n|---|---|---|---|---|\n");
        for row in &self.rows {
            let (ratio, better) = ratio_text(row);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {ratio} | {better} |",
                row.figure,
                cell(&row.ours.text),
                cell(&row.qga.text)
            );
        }
        out.push_str("\n### Issue 10's targets\n\n");
        out.push_str(&self.targets());
        for (title, body) in &self.details {
            let _ = write!(out, "\n### {title}\n\n{}", body.trim_end());
            out.push('\n');
        }
        out
    }
}

fn cell(text: &str) -> &str {
    if text.is_empty() {
        "–"
    } else {
        text
    }
}

/// The ratio cell and the "better" cell.
fn ratio_text(row: &Row) -> (String, String) {
    let (Some(o), Some(q)) = (row.ours.value, row.qga.value) else {
        return ("–".into(), "–".into());
    };
    if row.better == Better::Neither || o <= 0.0 || q <= 0.0 {
        return ("–".into(), "–".into());
    }
    let ratio = o / q;
    let factor = match row.better {
        Better::Lower => q / o,
        _ => o / q,
    };
    let better = if (factor - 1.0).abs() < 0.05 {
        "even".to_string()
    } else if factor > 1.0 {
        format!("ours, {}×", fmt_factor(factor))
    } else {
        format!("qemu-ga, {}×", fmt_factor(1.0 / factor))
    };
    (fmt_factor(ratio), better)
}

fn fmt_factor(f: f64) -> String {
    if f >= 100.0 {
        format!("{f:.0}")
    } else if f >= 10.0 {
        format!("{f:.1}")
    } else {
        format!("{f:.2}")
    }
}

/// A duration with a unit that suits it (µs, ms, s).
pub fn fmt_time(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// A number with thousands separators for large values, 3 significant
/// digits for small ones.
pub fn fmt_num(x: f64) -> String {
    if x >= 1000.0 {
        let n = x.round() as u64;
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// p50 and p99 of some durations.
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    samples.sort_unstable();
    let at = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    (at(50), at(99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_ratios() {
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(999.4), "999");
        assert_eq!(fmt_num(1.23456), "1.23");
        assert_eq!(fmt_time(Duration::from_micros(25)), "25 µs");
        assert_eq!(fmt_time(Duration::from_micros(2500)), "2.50 ms");
        let row = Row {
            figure: "x".into(),
            ours: Fig::new(10.0, "10"),
            qga: Fig::new(20.0, "20"),
            better: Better::Lower,
        };
        assert_eq!(ratio_text(&row), ("0.50".into(), "ours, 2.00×".into()));
        let row = Row {
            better: Better::Higher,
            ..row
        };
        assert_eq!(ratio_text(&row), ("0.50".into(), "qemu-ga, 2.00×".into()));
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(
            percentiles(&mut v),
            (Duration::from_micros(51), Duration::from_micros(100))
        );
    }
}
