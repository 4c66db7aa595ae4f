//! `kvm-agent-ctl`: the command-line front end of kvm-agent-client. The CLI
//! lives in `cli/`; this file only hands over to it.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
