//! The `kvm-manager-agent` binary: parse the command line, load the
//! configuration, run the library, map failures to exit codes.

use std::path::Path;
use std::process::ExitCode;

use kvm_manager_agent::cli::{Args, HELP};
use kvm_manager_agent::config::{Config, DEFAULT_CONFIG_PATH};
use kvm_manager_agent::{logging, server, AGENT_VERSION};

const EXIT_RUN: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kvm-manager-agent: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if args.help {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if args.version {
        println!(
            "kvm-manager-agent {AGENT_VERSION} (protocol {})",
            kvm_agent_protocol::PROTOCOL_VERSION
        );
        return ExitCode::SUCCESS;
    }

    let (config, origin) = match &args.config {
        Some(path) => (Config::load(path), path.display().to_string()),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => (
            Config::load(Path::new(DEFAULT_CONFIG_PATH)),
            DEFAULT_CONFIG_PATH.to_owned(),
        ),
        None => (Ok(Config::default()), "built-in defaults".to_owned()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvm-manager-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The key files are read again when serving; checked here so that a bad
    // one is a configuration error (and --check-config reports it).
    if let Err(e) = kvm_manager_agent::auth::Authenticator::from_config(&config.security) {
        eprintln!("kvm-manager-agent: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if args.check_config {
        println!("{origin}: configuration is valid");
        return ExitCode::SUCCESS;
    }

    let level_name = args.log_level.as_deref().unwrap_or(&config.agent.log_level);
    let Some(level) = logging::parse_level(level_name) else {
        eprintln!("kvm-manager-agent: --log-level {level_name}: expected error, warn, info, debug or trace");
        return ExitCode::from(EXIT_USAGE);
    };
    logging::init(level);
    log::info!("configuration: {origin}");

    let transports = if args.transports.is_empty() {
        config.transports()
    } else {
        args.transports
    };
    let qga_transports = if args.qga_transports.is_empty() {
        config.qga_transports()
    } else {
        args.qga_transports
    };
    if !qga_transports.is_empty() && config.security.hmac_key_file.is_some() {
        log::error!("--qga-transport: qemu-guest-agent's protocol cannot carry authentication, and security.hmac_key_file is set");
        return ExitCode::from(EXIT_CONFIG);
    }
    match server::run(config, transports, qga_transports) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(EXIT_RUN)
        }
    }
}
