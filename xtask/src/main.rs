//! `cargo xtask`: the project's own build and test tasks, std only.
//!
//! `src/main.rs` parses the command line and dispatches; each subcommand lives in
//! its own module. Every command that runs is printed first (`$ cargo ...`), and
//! any failed step ends the task with a non-zero exit status.

mod bench;
mod cmd;
mod demo;
mod dist;
mod ensure;
mod fuzz;
mod test;
mod vm;
mod windows;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Errors are plain messages: they are printed once, by `main`.
pub type Result<T = ()> = std::result::Result<T, String>;

const HELP: &str = "\
Usage: cargo xtask <COMMAND> [ARGS]

Commands:
  bench [--smoke] [--only SECTION,...]
                       Benchmark the agent against qemu-guest-agent (unix
                       sockets here, then both in one TCG guest) and write
                       the figures into docs/benchmarks.md; --smoke: every
                       benchmark briefly, only to check that each runs
  demo [--local]       Boot the minimal busybox guest under QEMU with the agent
                       inside and show kvm-agent-ctl talking to it: info,
                       metrics, exec, a file round trip, shutdown (about a
                       minute); --local: the agent on a temporary unix socket
                       on this machine instead, no VM
  dist                 Build every artifact into target/dist/: the static agent,
                       kvm-agent-ctl, .deb and .rpm packages, the tarball with
                       install.sh, man pages and shell completions
  test [OPTIONS] [STEP]...
                       Run every test (or only the named steps); installs or
                       checks what the steps need first
      --list           List the test steps and exit
      --fail-fast      Stop at the first failed step (default: run them all)
  vm-test [--env] [FILTER...] [-- ARGS...]
                       Build the guest images (static agent, Debian kernel,
                       busybox initramfs; cached) and run the VM tests of
                       crates/vmtest under QEMU (TCG)
  windows-cargo ARGS...
                       Run cargo for the Windows target (Debian's toolchain,
                       mingw-w64, tests under Wine; see README \"Building for
                       Windows\"), e.g. `windows-cargo build -p kvm-manager-agent`
  windows-msi          Build the MSI and install, upgrade and uninstall it
                       under Wine (the last part of `test windows`)
  fuzz [--seconds N] [TARGET]...
                       Run the cargo-fuzz targets of fuzz/ (nightly toolchain),
                       each for N seconds (default 600), one after the other
  help                 Show this help
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("help" | "-h" | "--help") => {
            print!("{HELP}");
            Ok(())
        }
        Some("test") => test::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("vm-test") => vm::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("windows-cargo") => windows::run(&args[1..]),
        Some("windows-msi") => windows::msi::run(),
        Some(other) => Err(format!(
            "unknown command `{other}` (run `cargo xtask help`)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the folder above `xtask/`).
pub fn root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
