//! Fuzzing: the cargo-fuzz targets of `fuzz/` (a workspace of its own, built
//! with the nightly toolchain), each run for a bounded time.
//!
//! - `cargo xtask test fuzz`: every target for [`STEP_SECONDS`], as a test
//!   step; any crash fails it.
//! - `cargo xtask fuzz [--seconds N] [TARGET]...`: the longer runs reported
//!   in docs/reliability.md.
//!
//! Each run starts from the committed seeds (`fuzz/corpus/<target>/`, read
//! only) and writes what it finds to `fuzz/target/corpus/<target>/`, which
//! later runs on the same machine reuse. A crashing input is saved under
//! `fuzz/artifacts/<target>/` and the run fails, naming it. A target may
//! have a libFuzzer dictionary beside it (`fuzz/<target>.dict`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ensure::Need;
use crate::{cmd, Result};

/// The targets, in the order they run.
pub const TARGETS: &[&str] = &[
    "frame_decoder",
    "request_dispatch",
    "path_resolver",
    "config_parser",
    "hmac_verify",
    "client_response",
];

/// Seconds per target in `cargo xtask test fuzz`.
pub const STEP_SECONDS: u32 = 45;

/// cargo-fuzz, pinned (its output format and flags are relied on).
pub const NEEDS: &[Need] = &[Need::CargoTool {
    krate: "cargo-fuzz",
    version: Some("0.13.2"),
    bin: "cargo-fuzz",
}];

/// The toolchain cargo-fuzz needs (`-Z` flags, sanitizers).
const TOOLCHAIN: &str = "+nightly";

fn fuzz_dir() -> PathBuf {
    crate::root().join("fuzz")
}

/// `cargo +nightly ...` in `fuzz/`, without what the outer cargo set for
/// the stable toolchain.
fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg(TOOLCHAIN).current_dir(fuzz_dir());
    for var in ["RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR"] {
        c.env_remove(var);
    }
    c
}

fn check_nightly() -> Result {
    if cmd::quietly_succeeds(nightly_cargo().arg("--version")) {
        Ok(())
    } else {
        Err(format!(
            "`cargo {TOOLCHAIN}` does not work: the nightly toolchain is missing \
             (these machines' images have it; elsewhere `rustup toolchain install nightly`)"
        ))
    }
}

/// Build every target, then run each for `seconds`. Fails on the first
/// crash, after running the others.
pub fn run_targets(targets: &[&str], seconds: u32) -> Result {
    check_nightly()?;
    cmd::run(nightly_cargo().args(["fuzz", "build"]))?;
    let mut failed = Vec::new();
    for target in targets {
        let found = fuzz_dir().join("target/corpus").join(target);
        std::fs::create_dir_all(&found)
            .map_err(|e| format!("cannot create {}: {e}", found.display()))?;
        let seeds = Path::new("corpus").join(target);
        let mut run = nightly_cargo();
        run.args(["fuzz", "run", target])
            .arg(&found)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-timeout=10", "-print_final_stats=1"]);
        // A dictionary of the input's words, where the target has one.
        let dict = format!("{target}.dict");
        if fuzz_dir().join(&dict).exists() {
            run.arg(format!("-dict={dict}"));
        }
        if let Err(e) = cmd::run(&mut run) {
            eprintln!("xtask: fuzz target {target}: {e}");
            failed.push(*target);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzz targets failed: {} (the crashing inputs are under fuzz/artifacts/)",
            failed.join(", ")
        ))
    }
}

/// The test step.
pub fn step(_: &mut crate::test::Report) -> Result {
    run_targets(TARGETS, STEP_SECONDS)
}

/// `cargo xtask fuzz [--seconds N] [TARGET]...`
pub fn run(args: &[String]) -> Result {
    let mut seconds = 600;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seconds takes a number")?;
            }
            a if a.starts_with('-') => {
                return Err(format!("unknown option `{a}` (run `cargo xtask help`)"))
            }
            t if TARGETS.contains(&t) => targets.push(t),
            t => {
                return Err(format!(
                    "unknown fuzz target `{t}` (targets: {})",
                    TARGETS.join(", ")
                ))
            }
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    crate::ensure::all(NEEDS)?;
    run_targets(&targets, seconds)
}
