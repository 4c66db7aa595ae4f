//! The `kvm-manager-agent` binary: parse the command line, load the
//! configuration, run the library, map failures to exit codes. With
//! `--service` (Windows) the same runs under the Service Control Manager
//! (`kvm_manager_agent::service::windows`).

use std::process::ExitCode;

use kvm_manager_agent::cli::{Args, HELP};
use kvm_manager_agent::config::{default_config_path, Config};
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
    if args.service {
        return ExitCode::from(service(args));
    }
    ExitCode::from(agent(args, Mode::Console))
}

#[cfg(windows)]
use kvm_manager_agent::service::windows::Control as ServiceControl;
/// No service outside Windows: [`Mode::Service`] cannot be made there.
#[cfg(not(windows))]
type ServiceControl = std::convert::Infallible;

/// Where the agent runs: the stop it waits for and where errors go.
enum Mode<'a> {
    /// In the foreground: stops on SIGTERM/SIGINT (Ctrl-C); errors on stderr.
    Console,
    /// Under the Windows SCM: stops on its STOP; errors in the Event Log.
    #[cfg_attr(not(windows), allow(dead_code))]
    Service(&'a ServiceControl),
}

impl Mode<'_> {
    fn error(&self, message: impl std::fmt::Display) {
        match self {
            Self::Console => eprintln!("kvm-manager-agent: {message}"),
            Self::Service(_) => log::error!("{message}"),
        }
    }
}

#[cfg(windows)]
fn service(args: Args) -> u8 {
    use kvm_manager_agent::service::windows;
    // No console: every line from the start goes to the Event Log.
    logging::init_event_log(log::LevelFilter::Info);
    match windows::dispatch(move |control| agent(args, Mode::Service(control))) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvm-manager-agent: {e}");
            log::error!("{e}");
            EXIT_RUN
        }
    }
}

#[cfg(not(windows))]
fn service(_args: Args) -> u8 {
    eprintln!("kvm-manager-agent: --service exists only on Windows (see --help)");
    EXIT_USAGE
}

/// Load the configuration and run until stopped; the exit code.
fn agent(args: Args, mode: Mode<'_>) -> u8 {
    let default_path = default_config_path();
    let (config, origin) = match &args.config {
        Some(path) => (Config::load(path), path.display().to_string()),
        None if default_path.exists() => (
            Config::load(&default_path),
            default_path.display().to_string(),
        ),
        None => (Ok(Config::default()), "built-in defaults".to_owned()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            mode.error(e);
            return EXIT_CONFIG;
        }
    };
    // The key files are read again when serving; checked here so that a bad
    // one is a configuration error (and --check-config reports it).
    if let Err(e) = kvm_manager_agent::auth::Authenticator::from_config(&config.security) {
        mode.error(e);
        return EXIT_CONFIG;
    }
    if args.check_config {
        println!("{origin}: configuration is valid");
        return 0;
    }

    let level_name = args.log_level.as_deref().unwrap_or(&config.agent.log_level);
    let Some(level) = logging::parse_level(level_name) else {
        mode.error(format_args!(
            "--log-level {level_name}: expected error, warn, info, debug or trace"
        ));
        return EXIT_USAGE;
    };
    // In service mode the Event Log logger is in place: this keeps it and
    // applies the level.
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
        return EXIT_CONFIG;
    }
    let ran = match mode {
        Mode::Console => server::run(config, transports, qga_transports),
        Mode::Service(control) => run_service(config, transports, qga_transports, control),
    };
    match ran {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            EXIT_RUN
        }
    }
}

#[cfg(windows)]
fn run_service(
    config: Config,
    transports: Vec<kvm_manager_agent::transport::TransportSpec>,
    qga_transports: Vec<kvm_manager_agent::transport::TransportSpec>,
    control: &ServiceControl,
) -> Result<(), server::ServerError> {
    server::run_until(
        config,
        transports,
        qga_transports,
        control.stop_requested(),
        || control.running(),
    )
}

#[cfg(not(windows))]
fn run_service(
    _: Config,
    _: Vec<kvm_manager_agent::transport::TransportSpec>,
    _: Vec<kvm_manager_agent::transport::TransportSpec>,
    control: &ServiceControl,
) -> Result<(), server::ServerError> {
    match *control {}
}
