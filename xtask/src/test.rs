//! `cargo xtask test`: every test of the project, as a list of steps.
//!
//! To add a step: write a `fn(&mut Report) -> Result` below and add a [`Step`]
//! to [`STEPS`] with what it needs ([`Need`]s are installed or checked before
//! any step runs). A step that runs a test harness should feed its counts to
//! the [`Report`] so they show in the closing summary.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd;
use crate::ensure::{self, Need};
use crate::Result;

/// One step of `cargo xtask test`.
#[derive(Debug)]
pub struct Step {
    /// Short name, used on the command line (`cargo xtask test clippy`).
    pub name: &'static str,
    /// One line saying what it checks.
    pub about: &'static str,
    /// What must be installed before it runs.
    pub needs: &'static [Need],
    /// The step itself.
    pub run: fn(&mut Report) -> Result,
}

const RUSTFMT: Need = Need::Component {
    subcommand: "fmt",
    component: "rustfmt",
};
const CLIPPY: Need = Need::Component {
    subcommand: "clippy",
    component: "clippy",
};

/// Every step, in the order they run.
pub const STEPS: &[Step] = &[
    Step {
        name: "fmt",
        about: "formatting (rustfmt)",
        needs: &[RUSTFMT],
        run: fmt,
    },
    Step {
        name: "clippy",
        about: "lints on every target, warnings are errors",
        needs: &[CLIPPY],
        run: clippy,
    },
    Step {
        name: "cargo-test",
        about: "cargo test: unit, integration and doc tests of every crate (the qemu-ga conformance suite runs Debian's qemu-ga; the agent's fault tests jump its clock with libfaketime)",
        needs: &[Need::Apt("qemu-guest-agent"), Need::Apt("libfaketime")],
        run: cargo_test,
    },
    Step {
        name: "soak",
        about: "release build: a million mixed requests (RSS and descriptors flat), a gibibyte of garbage (RSS bounded)",
        needs: &[],
        run: soak,
    },
    Step {
        name: "fuzz",
        about: "every cargo-fuzz target of fuzz/ for 45 s (nightly toolchain, cargo-fuzz installed when missing)",
        needs: crate::fuzz::NEEDS,
        run: crate::fuzz::step,
    },
    Step {
        name: "windows",
        about: "the Windows target: clippy -D warnings, then the tests under Wine (Debian's rustc-web, mingw-w64)",
        needs: crate::windows::NEEDS,
        run: crate::windows::step,
    },
    Step {
        name: "packages",
        about: "cargo xtask dist, then lintian, .deb/.rpm contents and scriptlets, rpm into a scratch root, tarball install.sh with --destdir",
        needs: crate::dist::checks::NEEDS,
        run: crate::dist::checks::step,
    },
    Step {
        name: "vm",
        about:
            "VM tests: the agent's virtio-serial and vsock transports in real guests (QEMU, TCG); virsh's agent commands through a private libvirtd",
        needs: &[],
        run: crate::vm::step,
    },
    Step {
        name: "bench",
        about: "cargo xtask bench --smoke: every benchmark against qemu-guest-agent runs once, briefly (installs qemu-guest-agent; no timing is checked)",
        needs: &[],
        run: crate::bench::step,
    },
    Step {
        name: "debian",
        about: "the .deb in a Debian bookworm guest under systemd (install, agent answers, upgrade keeps config, remove, purge); tarball install.sh in a chroot",
        needs: crate::vm::debian::NEEDS,
        run: crate::vm::debian::step,
    },
];

fn fmt(_: &mut Report) -> Result {
    cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
}

fn clippy(_: &mut Report) -> Result {
    cmd::run(cmd::cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn cargo_test(report: &mut Report) -> Result {
    let mut test = cmd::cargo();
    // The VM tests need their images: they run in the `vm` step.
    test.args([
        "test",
        "--workspace",
        "--exclude",
        crate::vm::HARNESS,
        "--no-fail-fast",
    ]);
    run_cargo_test(&mut test, report)
}

fn soak(report: &mut Report) -> Result {
    let mut test = cmd::cargo();
    test.args([
        "test",
        "--release",
        "-p",
        "kvm-manager-agent",
        "--features",
        "soak",
        "--test",
        "soak",
        "--",
        "--nocapture",
        "--test-threads=1",
    ]);
    run_cargo_test(&mut test, report)
}

/// Run a `cargo test` command, passing its output through and collecting the
/// counts of every test binary into `report`. Fails if it ran no test at all.
pub fn run_cargo_test(test: &mut Command, report: &mut Report) -> Result {
    let before = report.suites.len();
    let mut label = String::from("tests");
    let result = cmd::run_streaming(test, |line| {
        if let Some(l) = suite_label(line) {
            label = l;
        } else if let Some(counts) = parse_test_result(line) {
            report.suites.push(Suite {
                label: label.clone(),
                counts,
            });
        }
    });
    result?;
    let ran: u64 = report.suites[before..]
        .iter()
        .map(|s| s.counts.passed + s.counts.failed)
        .sum();
    if ran == 0 {
        return Err(format!("`{}` ran no test", cmd::display(test)));
    }
    Ok(())
}

/// Counts from one `test result:` line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// One test binary's results.
#[derive(Debug)]
pub struct Suite {
    pub label: String,
    pub counts: Counts,
}

/// What the steps found, printed at the end.
#[derive(Debug, Default)]
pub struct Report {
    pub suites: Vec<Suite>,
}

impl Report {
    fn total(&self) -> Counts {
        self.suites.iter().fold(Counts::default(), |t, s| Counts {
            passed: t.passed + s.counts.passed,
            failed: t.failed + s.counts.failed,
            ignored: t.ignored + s.counts.ignored,
        })
    }
}

/// `Running unittests src/lib.rs (target/debug/deps/foo-0123)` becomes
/// `unittests src/lib.rs (foo)`; `Doc-tests foo` becomes `doc-tests foo`.
/// Only lines indented as cargo indents its status lines count.
fn suite_label(line: &str) -> Option<String> {
    if !line.starts_with(' ') {
        return None;
    }
    let line = line.trim();
    if let Some(name) = line.strip_prefix("Doc-tests ") {
        return Some(format!("doc-tests {}", name.trim()));
    }
    let what = line.strip_prefix("Running ")?.trim();
    let Some((target, binary)) = what.split_once(" (") else {
        return Some(what.to_string());
    };
    let binary = binary.trim_end_matches(')');
    let file = binary.rsplit('/').next().unwrap_or(binary);
    let file = file.strip_suffix(".exe").unwrap_or(file);
    let name = match file.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name,
        _ => file,
    };
    Some(format!("{target} ({name})"))
}

/// Parse `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; ...`.
fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, fields) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    for field in fields.split(';') {
        let mut words = field.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => {}
        }
    }
    Some(counts)
}

/// `cargo xtask test [--list] [--fail-fast] [STEP]...`
pub fn run(args: &[String]) -> Result {
    let mut fail_fast = false;
    let mut names = Vec::new();
    for arg in args {
        match arg.as_str() {
            "--list" => {
                for step in STEPS {
                    println!("{:<10} {}", step.name, step.about);
                }
                return Ok(());
            }
            "--fail-fast" => fail_fast = true,
            a if a.starts_with('-') => {
                return Err(format!("unknown option `{a}` (run `cargo xtask help`)"))
            }
            name => names.push(name),
        }
    }
    let steps = select(&names)?;

    let needs: Vec<Need> = steps.iter().flat_map(|s| s.needs.iter().copied()).collect();
    ensure::all(&needs)?;

    let mut report = Report::default();
    let mut outcomes: Vec<(&Step, Duration, Result)> = Vec::new();
    for step in &steps {
        println!("\n==> {}: {}", step.name, step.about);
        let started = Instant::now();
        let result = (step.run)(&mut report);
        if let Err(e) = &result {
            eprintln!("xtask: step `{}` failed: {e}", step.name);
        }
        let failed = result.is_err();
        outcomes.push((step, started.elapsed(), result));
        if failed && fail_fast {
            break;
        }
    }

    println!("\n==> summary");
    for (step, elapsed, result) in &outcomes {
        let verdict = if result.is_ok() { "ok" } else { "FAILED" };
        println!(
            "  {:<10} {:<7} {:>7.1}s",
            step.name,
            verdict,
            elapsed.as_secs_f64()
        );
    }
    for step in &steps[outcomes.len()..] {
        println!("  {:<10} not run (--fail-fast)", step.name);
    }
    if !report.suites.is_empty() {
        println!("test binaries:");
        let mut empty = 0;
        for suite in &report.suites {
            let c = suite.counts;
            if c.passed + c.failed + c.ignored == 0 {
                empty += 1;
                continue;
            }
            println!(
                "  {}: {} passed, {} failed, {} ignored",
                suite.label, c.passed, c.failed, c.ignored
            );
        }
        if empty > 0 {
            println!("  ({empty} more with no tests)");
        }
        let t = report.total();
        println!(
            "tests: {} passed, {} failed, {} skipped",
            t.passed, t.failed, t.ignored
        );
    }

    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|(_, _, r)| r.is_err())
        .map(|(s, _, _)| s.name)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("failed steps: {}", failed.join(", ")))
    }
}

/// The steps named on the command line, in their usual order; all when none.
fn select<'a>(names: &[&str]) -> Result<Vec<&'a Step>> {
    if let Some(unknown) = names.iter().find(|n| !STEPS.iter().any(|s| s.name == **n)) {
        let known: Vec<&str> = STEPS.iter().map(|s| s.name).collect();
        return Err(format!(
            "unknown test step `{unknown}` (steps: {})",
            known.join(", ")
        ));
    }
    Ok(STEPS
        .iter()
        .filter(|s| names.is_empty() || names.contains(&s.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_test_result_lines() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some(Counts {
                passed: 12,
                failed: 0,
                ignored: 2
            })
        );
        assert_eq!(
            parse_test_result(
                "test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some(Counts {
                passed: 3,
                failed: 1,
                ignored: 0
            })
        );
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }

    #[test]
    fn labels_test_binaries() {
        assert_eq!(
            suite_label("     Running unittests src/lib.rs (target/debug/deps/kvm_agent_protocol-1a2b3c4d5e6f7a8b)")
                .as_deref(),
            Some("unittests src/lib.rs (kvm_agent_protocol)")
        );
        assert_eq!(
            suite_label("     Running tests/roundtrip.rs (target/debug/deps/roundtrip-00ff)")
                .as_deref(),
            Some("tests/roundtrip.rs (roundtrip)")
        );
        assert_eq!(
            suite_label("     Running tests/x.rs (target/windows/x86_64-pc-windows-gnu/debug/deps/x-00ff.exe)")
                .as_deref(),
            Some("tests/x.rs (x)")
        );
        assert_eq!(
            suite_label("   Doc-tests kvm_agent_protocol").as_deref(),
            Some("doc-tests kvm_agent_protocol")
        );
        assert_eq!(suite_label("   Compiling xtask v0.0.0"), None);
        assert_eq!(
            suite_label("Running tests/x.rs (a test's own output)"),
            None
        );
    }

    #[test]
    fn step_names_are_unique_and_selectable() {
        let all = select(&[]).unwrap();
        assert_eq!(all.len(), STEPS.len());
        for (i, a) in STEPS.iter().enumerate() {
            assert!(STEPS[i + 1..].iter().all(|b| b.name != a.name));
        }
        let some = select(&["cargo-test", "fmt"]).unwrap();
        let names: Vec<&str> = some.iter().map(|s| s.name).collect();
        assert_eq!(names, ["fmt", "cargo-test"]);
        assert!(select(&["nope"]).is_err());
    }

    #[test]
    fn totals_add_up() {
        let mut report = Report::default();
        for (p, f, i) in [(3, 0, 1), (2, 1, 0)] {
            report.suites.push(Suite {
                label: "x".into(),
                counts: Counts {
                    passed: p,
                    failed: f,
                    ignored: i,
                },
            });
        }
        assert_eq!(
            report.total(),
            Counts {
                passed: 5,
                failed: 1,
                ignored: 1
            }
        );
    }
}
