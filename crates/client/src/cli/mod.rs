//! `kvm-agent-ctl`: talk to a kvm-manager-agent from the host.

mod codec;
mod output;
mod prometheus;
mod transfer;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use kvm_agent_client::protocol::frame::{DEFAULT_MAX_FRAME_BYTES, MIN_MAX_FRAME_BYTES};
use kvm_agent_client::protocol::methods::core::NoParams;
use kvm_agent_client::protocol::methods::exec::{
    Encoding, ExecParams, ExecStartParams, ExecStatusParams, Output,
};
use kvm_agent_client::protocol::methods::files::{CopyFromGuestParams, CopyToGuestParams};
use kvm_agent_client::protocol::methods::info::{GetInfoParams, GetMetricsParams, Metrics};
use kvm_agent_client::protocol::methods::power::{PowerAction, PowerParams};
use kvm_agent_client::protocol::methods::{self as m, Method};
use kvm_agent_client::protocol::ErrorCode;
use kvm_agent_client::{AuthKey, Client, ClientError, ClientOptions, ErrorKind, Target};
use serde_json::Value;

/// Exit status: success.
const EXIT_OK: u8 = 0;
/// Exit status: the agent answered with an error.
const EXIT_AGENT: u8 = 1;
/// Exit status: usage error (also clap's).
const EXIT_USAGE: u8 = 2;
/// Exit status: could not connect, connection lost, or timed out.
const EXIT_CONNECTION: u8 = 3;
/// Exit status: the agent sent something malformed.
const EXIT_PROTOCOL: u8 = 4;

const AFTER_HELP: &str = "\
Targets (--connect or KVM_AGENT_CONNECT):
  unix:PATH          a unix socket: QEMU's virtio-serial chardev socket,
                     or the agent's own unix: listener
  vsock:CID:PORT     AF_VSOCK to the guest with context id CID (Linux hosts)
  hvsock:PATH:PORT   hybrid vsock of Firecracker, Cloud Hypervisor or
                     vhost-device-vsock: the VMM's unix socket PATH, guest PORT
  pipe:NAME          inside a Windows guest: the agent's named pipe
                     \\\\.\\pipe\\NAME (the agent's pipe: transport)

Exit codes:
  0  success
  1  the agent answered with an error (its message and data go to stderr)
  2  usage error: bad arguments or target, a local file that cannot be read
     or written (also the --key-file), a request too large to send
  3  could not connect, connection lost, or timed out
  4  the agent sent something malformed, or (with --key-file) an answer
     without a valid MAC
  exec exits with the remote command's exit code instead
  (128+N when the command was killed by signal N).

Examples:
  kvm-agent-ctl --connect unix:/run/vm1/agent.sock ping
  KVM_AGENT_CONNECT=vsock:42:1024 kvm-agent-ctl caps
  kvm-agent-ctl -c hvsock:/run/fc/v.sock:1024 exec -- uname -a
  kvm-agent-ctl -c vsock:42:1024 --key-file /etc/kvm-agent/vm42.key ping";

/// Talk to a kvm-manager-agent running inside a guest.
///
/// Connects to the agent through a unix socket, AF_VSOCK or hybrid vsock,
/// waits for its agent_ready greeting, sends one request and prints the
/// answer: readable by default, raw JSON with --json.
#[derive(Debug, Parser)]
#[command(name = "kvm-agent-ctl", version, after_help = AFTER_HELP)]
struct Cli {
    /// Where the agent is: unix:PATH, vsock:CID:PORT, hvsock:PATH:PORT or pipe:NAME.
    #[arg(
        short,
        long,
        env = "KVM_AGENT_CONNECT",
        value_name = "SPEC",
        global = true
    )]
    connect: Option<Target>,

    /// Seconds allowed for connecting (including agent_ready) and for the call.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    timeout: Duration,

    /// Print the agent's raw JSON result instead of a readable rendering.
    #[arg(long, global = true)]
    json: bool,

    /// Largest frame accepted from or sent to the agent, in bytes.
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = DEFAULT_MAX_FRAME_BYTES,
        value_parser = clap::value_parser!(u32).range(i64::from(MIN_MAX_FRAME_BYTES)..),
        global = true
    )]
    max_frame_bytes: u32,

    /// Sign requests with the shared key in this file (hex, as the agent's
    /// [security] hmac_key_file) and check the MAC of every answer; for an
    /// agent with authentication on.
    #[arg(long, env = "KVM_AGENT_KEY_FILE", value_name = "PATH", global = true)]
    key_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that the agent answers, and print the round-trip time.
    ///
    /// Example: kvm-agent-ctl -c unix:/run/vm1/agent.sock ping --count 3
    Ping {
        /// Number of pings, one second apart.
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u32,
    },
    /// Show versions, OS family, allowed methods and limits.
    ///
    /// Lists what the agent will execute under its current policy and the
    /// limits a host must respect (frame size, chunk size, batch length).
    ///
    /// Example: kvm-agent-ctl -c unix:/run/vm1/agent.sock caps
    Caps,
    /// Show OS, hostname, network interfaces, boot id, uptime and time zone.
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 info --all-interfaces
    Info {
        /// Include interfaces the agent's filter hides (container plumbing).
        #[arg(long)]
        all_interfaces: bool,
    },
    /// Show CPU, memory, disk, network and filesystem figures.
    ///
    /// CPU usage and rates cover the time since the agent's previous sample
    /// (agent-wide: any host's previous get_metrics, or the agent's start).
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 metrics --watch 5
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 metrics --prometheus > /var/lib/node_exporter/vm42.prom
    Metrics {
        /// Also report network filesystems.
        #[arg(long)]
        include_network_filesystems: bool,
        /// Include interfaces the agent's filter hides (container plumbing).
        #[arg(long)]
        all_interfaces: bool,
        /// Refresh every SECS seconds (default 2) until interrupted: in place
        /// on a terminal, else as successive blocks.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2", value_parser = parse_secs)]
        watch: Option<Duration>,
        /// Print the Prometheus text exposition format.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
    },
    /// List logged-in users.
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 users
    Users,
    /// Run an allowed command in the guest and wait for it to finish.
    ///
    /// The remote standard output and error are written to the local ones
    /// as they arrive (exec_start, then exec_status polled with offsets, so
    /// nothing is lost and nothing is held back until the end), and
    /// kvm-agent-ctl exits with the remote exit code (128+N when the command
    /// was killed by signal N). No shell is involved: the arguments are
    /// passed as a vector. Only commands on the agent's allowlist run.
    /// When the local standard input is not a terminal (a pipe or a file) it
    /// is read to its end and sent to the command (--no-stdin: don't).
    /// With --json or --max-output-bytes the command runs with one `exec`
    /// call instead, and the output is printed when it ends.
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 exec --env LANG=C --cwd /tmp -- ls -la
    Exec(ExecArgs),
    /// Copy one file to or from the guest; exactly one side is guest:/PATH.
    ///
    /// Local files of any size travel in chunks (file_open, file_write or
    /// file_read, file_close), several in flight, with a progress bar on a
    /// terminal; the SHA-256 of the whole file is checked at both ends. A
    /// download goes to DST.kva-part and is renamed into place once verified.
    /// --resume continues an interrupted copy: an upload from what the agent
    /// still holds of it, a download from the partial local file. A local SRC
    /// or DST of "-" (standard input or output) travels in one message and
    /// must fit in a frame.
    ///
    /// Example (to the guest): kvm-agent-ctl -c vsock:42:1024 cp ./app.conf guest:/etc/app/app.conf --overwrite
    ///
    /// Example (from the guest): kvm-agent-ctl -c vsock:42:1024 cp guest:/var/log/app.log ./
    Cp(CpArgs),
    /// Power the guest off (needs --yes).
    ///
    /// Without --yes the request is sent with confirm=false and the agent
    /// answers "confirmation required" (exit code 1): a dry run.
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 shutdown --delay 60 --message "maintenance" --yes
    Shutdown(PowerArgs),
    /// Restart the guest (needs --yes).
    ///
    /// Without --yes the request is sent with confirm=false and the agent
    /// answers "confirmation required" (exit code 1): a dry run.
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 reboot --yes
    Reboot(PowerArgs),
    /// Call any method with raw JSON params and print the raw JSON result.
    ///
    /// JSON_PARAMS must be a JSON object or array; omit it to send no params.
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 call get_info '{"all_interfaces":true}'
    Call {
        /// The method name, e.g. get_capabilities.
        method: String,
        /// The params, as a JSON object or array.
        json_params: Option<String>,
    },
    /// Print every agent_ready: start-ups, restarts and guest reboots.
    ///
    /// Waits for the agent (retrying once a second while it is unreachable),
    /// prints its agent_ready, then checks the connection with a ping every
    /// --interval seconds; when it is lost, waits for the agent again and
    /// prints the new agent_ready, marking a changed boot id as a reboot.
    /// Runs until interrupted.
    ///
    /// Example: kvm-agent-ctl -c vsock:42:1024 watch-ready --interval 5
    WatchReady {
        /// Seconds between liveness pings.
        #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_secs)]
        interval: Duration,
    },
    /// Print a shell completion script.
    ///
    /// Example: kvm-agent-ctl completions bash > /etc/bash_completion.d/kvm-agent-ctl
    Completions {
        /// The shell to generate completions for.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// Kill the command after this many milliseconds.
    #[arg(long = "timeout", value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Add a variable to the command's environment (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest (default /).
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Send the local standard input to the command (the default when it
    /// is not a terminal).
    #[arg(long, conflicts_with = "no_stdin")]
    stdin: bool,
    /// Never send the local standard input, even from a pipe.
    #[arg(long)]
    no_stdin: bool,
    /// Keep at most this many bytes of each output stream.
    #[arg(long, value_name = "BYTES")]
    max_output_bytes: Option<u64>,
    /// The command and its arguments.
    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    argv: Vec<String>,
}

#[derive(Debug, Args)]
struct CpArgs {
    /// Source: a local path, "-", or guest:/PATH.
    src: String,
    /// Destination: a local path or directory, "-", or guest:/PATH.
    dst: String,
    /// Replace an existing destination file.
    #[arg(long)]
    overwrite: bool,
    /// Permission bits of a file created in the guest, in octal (default 600).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    mode: Option<u32>,
    /// Create missing parent directories in the guest.
    #[arg(long)]
    parents: bool,
    /// Continue an interrupted copy instead of starting over.
    #[arg(long)]
    resume: bool,
}

#[derive(Debug, Args)]
struct PowerArgs {
    /// Skip the orderly shutdown of services.
    #[arg(long)]
    force: bool,
    /// Wait this many seconds before acting.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    delay: u32,
    /// Message shown to logged-in users.
    #[arg(long, value_name = "M")]
    message: Option<String>,
    /// Really do it (sends confirm=true).
    #[arg(long)]
    yes: bool,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0 * 365.0) {
        return Err("must be more than 0 seconds (and at most a year)".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not K=V")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 644"))
}

/// Why the command failed, short of a clean result.
#[derive(Debug)]
enum Failure {
    Client(ClientError),
    Usage(String),
    Protocol(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

type Outcome = Result<u8, Failure>;

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "kvm-agent-ctl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let Some(target) = cli.connect.clone() else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "no agent to talk to: pass --connect SPEC or set KVM_AGENT_CONNECT",
            )
            .exit();
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_CONNECTION);
        }
    };
    let json = cli.json;
    let code = match runtime.block_on(run(cli, target)) {
        Ok(code) => code,
        Err(f) => report(&f, json),
    };
    ExitCode::from(code)
}

fn report(f: &Failure, json: bool) -> u8 {
    match f {
        Failure::Usage(msg) => {
            eprintln!("error: {msg}");
            EXIT_USAGE
        }
        Failure::Protocol(msg) => {
            eprintln!("error: {msg}");
            EXIT_PROTOCOL
        }
        Failure::Client(ClientError::Agent(obj)) => {
            if json {
                eprintln!(
                    "{}",
                    serde_json::to_string(obj).unwrap_or_else(|_| obj.to_string())
                );
            } else {
                let name = obj.kind().map_or("unknown", ErrorCode::name);
                eprintln!("error: {} (code {}, {name})", obj.message, obj.code);
                if let Some(data) = &obj.data {
                    eprintln!("data: {data}");
                }
                if obj.kind() == Some(ErrorCode::ConfirmationRequired) {
                    eprintln!("hint: pass --yes to confirm");
                }
            }
            EXIT_AGENT
        }
        Failure::Client(e) => {
            eprintln!("error: {e}");
            match e {
                ClientError::RequestTooLarge { .. } | ClientError::InvalidTarget(_) => EXIT_USAGE,
                _ => match e.kind() {
                    ErrorKind::Agent => EXIT_AGENT,
                    ErrorKind::Protocol => EXIT_PROTOCOL,
                    _ => EXIT_CONNECTION,
                },
            }
        }
    }
}

async fn run(cli: Cli, target: Target) -> Outcome {
    let auth = match &cli.key_file {
        Some(path) => Some(AuthKey::from_file(path).map_err(|e| Failure::Usage(e.to_string()))?),
        None => None,
    };
    let options = ClientOptions {
        call_timeout: cli.timeout,
        connect_timeout: cli.timeout,
        wait_for_ready: true,
        max_frame_bytes: cli.max_frame_bytes,
        // One request per invocation: a lost connection is reported, not hidden.
        reconnect: false,
        auth,
        ..ClientOptions::default()
    };
    let json = cli.json;
    if let Command::WatchReady { interval } = cli.command {
        return watch_ready(target, options, interval, json).await;
    }
    let client = Client::connect(target, options).await?;
    match cli.command {
        Command::Ping { count } => ping(&client, count, json).await,
        Command::Caps => {
            show::<m::GetCapabilitiesMethod>(&client, &NoParams {}, json, output::capabilities)
                .await
        }
        Command::Info { all_interfaces } => {
            show::<m::GetInfoMethod>(
                &client,
                &GetInfoParams { all_interfaces },
                json,
                output::info,
            )
            .await
        }
        Command::Metrics {
            include_network_filesystems,
            all_interfaces,
            watch,
            prometheus,
        } => {
            let params = GetMetricsParams {
                include_network_filesystems,
                all_interfaces,
            };
            let render = if prometheus {
                prometheus::render
            } else {
                output::metrics
            };
            match watch {
                None => show::<m::GetMetricsMethod>(&client, &params, json, render).await,
                Some(every) => watch_metrics(&client, &params, json, render, every).await,
            }
        }
        Command::Users => {
            show::<m::GetUsersMethod>(&client, &NoParams {}, json, output::users).await
        }
        Command::Exec(args) => exec(&client, args, json).await,
        Command::Cp(args) => cp(&client, args, json).await,
        Command::Shutdown(args) => power(&client, PowerAction::Shutdown, args, json).await,
        Command::Reboot(args) => power(&client, PowerAction::Reboot, args, json).await,
        Command::Call {
            method,
            json_params,
        } => call(&client, &method, json_params.as_deref(), json).await,
        Command::Completions { .. } | Command::WatchReady { .. } => Ok(EXIT_OK),
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Call `M`: with --json print the agent's raw result (unknown members
/// included), else decode it and print `render`'s text.
async fn show<M: Method>(
    client: &Client,
    params: &M::Params,
    json: bool,
    render: fn(&M::Result) -> String,
) -> Outcome {
    if json {
        let params = serde_json::to_value(params)
            .map_err(|e| Failure::Usage(format!("cannot encode params: {e}")))?;
        print_json(&client.call_raw(M::NAME, Some(params)).await?);
    } else {
        let result = client.call::<M>(params).await?;
        print!("{}", render(&result));
    }
    Ok(EXIT_OK)
}

/// `metrics --watch`: call get_metrics every `every` until interrupted. On
/// a terminal each refresh clears the screen and redraws from the top; else
/// the blocks follow each other, separated by a blank line.
async fn watch_metrics(
    client: &Client,
    params: &GetMetricsParams,
    json: bool,
    render: fn(&Metrics) -> String,
    every: Duration,
) -> Outcome {
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal();
    let mut first = true;
    loop {
        let text = if json {
            let params = serde_json::to_value(params)
                .map_err(|e| Failure::Usage(format!("cannot encode params: {e}")))?;
            let v = client
                .call_raw(m::GetMetricsMethod::NAME, Some(params))
                .await?;
            format!("{v}\n")
        } else {
            render(&client.call::<m::GetMetricsMethod>(params).await?)
        };
        let mut stdout = std::io::stdout().lock();
        let written = if terminal {
            write!(stdout, "\x1b[H\x1b[2J{text}")
        } else if first || json {
            write!(stdout, "{text}")
        } else {
            write!(stdout, "\n{text}")
        };
        if written.and_then(|()| stdout.flush()).is_err() {
            // The reader went away (a closed pipe): stop quietly.
            return Ok(EXIT_OK);
        }
        drop(stdout);
        first = false;
        tokio::time::sleep(every).await;
    }
}

async fn ping(client: &Client, count: u32, json: bool) -> Outcome {
    let target = client.target().clone();
    for i in 0..count.max(1) {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let rtt = client.ping().await?;
        let ms = rtt.as_secs_f64() * 1000.0;
        if json {
            println!("{}", serde_json::json!({ "rtt_ms": ms }));
        } else {
            let boot = client
                .agent_ready()
                .map(|r| format!(" (agent {}, boot {})", r.agent_version, r.boot_id))
                .unwrap_or_default();
            println!("pong from {target}{boot}: time={ms:.3} ms");
        }
    }
    Ok(EXIT_OK)
}

async fn watch_ready(
    target: Target,
    options: ClientOptions,
    interval: Duration,
    json: bool,
) -> Outcome {
    let connect_timeout = options.connect_timeout;
    let client = Client::lazy(
        target,
        ClientOptions {
            reconnect: true,
            ..options
        },
    );
    let mut last_boot: Option<String> = None;
    let mut waiting_said = false;
    loop {
        let ready = match client.wait_ready(connect_timeout).await {
            Ok(r) => r,
            Err(e) if e.is_connection_error() => {
                if !waiting_said {
                    eprintln!("waiting for the agent: {e}");
                    waiting_said = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        waiting_said = false;
        let rebooted = last_boot.as_ref().is_some_and(|b| *b != ready.boot_id);
        if json {
            let v = serde_json::to_value(&ready).map_err(|e| Failure::Protocol(e.to_string()))?;
            println!("{v}");
        } else {
            let note = if rebooted { " (guest rebooted)" } else { "" };
            println!(
                "agent_ready: agent {} protocol {} os {} boot {}{note}",
                ready.agent_version,
                ready.protocol_version,
                ready.os_family.as_str(),
                ready.boot_id
            );
        }
        last_boot = Some(ready.boot_id);
        // Watch the connection until it is lost.
        loop {
            tokio::time::sleep(interval).await;
            // Seen first, so that a quiet reconnect inside the ping below
            // cannot hide an agent restart.
            if !client.is_connected().await {
                eprintln!("connection lost");
                break;
            }
            match client.call::<m::PingMethod>(&NoParams {}).await {
                Ok(_) if client.agent_ready().map(|r| r.boot_id) == last_boot => {}
                // A reconnect happened inside the call: report the new greeting.
                Ok(_) => break,
                Err(e) if e.is_connection_error() => {
                    eprintln!("connection lost: {e}");
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn decode_output(o: &Output) -> Result<Vec<u8>, Failure> {
    match o.encoding {
        Encoding::Utf8 => Ok(o.data.clone().into_bytes()),
        Encoding::Base64 => codec::base64_decode(&o.data)
            .map_err(|e| Failure::Protocol(format!("the agent sent bad base64 output: {e}"))),
    }
}

/// The exit status a shell would report for a remote exit.
fn remote_status(exit_code: Option<i32>, signal: Option<i32>) -> u8 {
    match (exit_code, signal) {
        (_, Some(sig)) => 128u8.wrapping_add((sig & 0x7f) as u8),
        (Some(code), None) => (code & 0xff) as u8,
        (None, None) => EXIT_PROTOCOL,
    }
}

/// Whether the local standard input is a terminal.
fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

async fn exec(client: &Client, args: ExecArgs, json: bool) -> Outcome {
    let mut argv = args.argv.into_iter();
    let command = argv
        .next()
        .ok_or_else(|| Failure::Usage("exec needs a command".into()))?;
    let send_stdin = args.stdin || (!args.no_stdin && !stdin_is_terminal());
    let stdin_base64 = if send_stdin {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
        Some(codec::base64_encode(&buf))
    } else {
        None
    };
    if !json && args.max_output_bytes.is_none() {
        let params = ExecStartParams {
            command,
            args: argv.collect(),
            env: args.env.into_iter().collect(),
            cwd: args.cwd,
            stdin_base64,
            timeout_ms: args.timeout_ms,
        };
        return exec_streaming(client, params).await;
    }
    let params = ExecParams {
        command,
        args: argv.collect(),
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        stdin_base64,
        timeout_ms: args.timeout_ms,
        max_output_bytes: args.max_output_bytes,
    };
    let r = client.exec(&params).await?;
    let status = remote_status(r.exit_code, r.signal);
    if json {
        let v = serde_json::to_value(&r).map_err(|e| Failure::Protocol(e.to_string()))?;
        print_json(&v);
        return Ok(status);
    }
    let out = decode_output(&r.stdout)?;
    let err = decode_output(&r.stderr)?;
    {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&out);
        let _ = stdout.flush();
    }
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(&err);
    if r.stdout_truncated {
        let _ = writeln!(stderr, "kvm-agent-ctl: remote stdout was truncated");
    }
    if r.stderr_truncated {
        let _ = writeln!(stderr, "kvm-agent-ctl: remote stderr was truncated");
    }
    if r.timed_out {
        let _ = writeln!(
            stderr,
            "kvm-agent-ctl: the command timed out after {} ms and was killed",
            r.duration_ms
        );
    } else if let Some(sig) = r.signal {
        let _ = writeln!(
            stderr,
            "kvm-agent-ctl: the command was killed by signal {sig}"
        );
    }
    Ok(status)
}

/// After the command exited, how long to wait for output that processes it
/// left in the background still write (their pipes stay open).
const AFTER_EXIT: Duration = Duration::from_secs(1);
/// Longest pause between two polls that brought nothing.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// `exec` as a stream: exec_start, then exec_status from the offsets
/// reached, writing each piece as it comes.
async fn exec_streaming(client: &Client, params: ExecStartParams) -> Outcome {
    let started = client.exec_start(&params).await?;
    let mut status = ExecStatusParams {
        handle: started.handle,
        ..ExecStatusParams::default()
    };
    let mut idle = Duration::from_millis(5);
    let mut quiet_since: Option<std::time::Instant> = None;
    let last = loop {
        let st = client.exec_status(&status).await?;
        let out = decode_output(&st.stdout)?;
        let err = decode_output(&st.stderr)?;
        if !out.is_empty() {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&out);
            let _ = stdout.flush();
        }
        if !err.is_empty() {
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(&err);
            let _ = stderr.flush();
        }
        status.stdout_offset = st.stdout_next_offset;
        status.stderr_offset = st.stderr_next_offset;
        if st.output_complete {
            break st;
        }
        if out.is_empty() && err.is_empty() {
            if st.exited {
                let since = *quiet_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= AFTER_EXIT {
                    eprintln!(
                        "kvm-agent-ctl: the command exited; processes it left running still hold its output"
                    );
                    break st;
                }
            }
            tokio::time::sleep(idle).await;
            idle = (idle * 2).min(MAX_POLL_INTERVAL);
        } else {
            idle = Duration::from_millis(5);
            quiet_since = None;
        }
    };
    if last.timed_out {
        eprintln!("kvm-agent-ctl: the command timed out and was killed");
    } else if let Some(sig) = last.signal {
        eprintln!("kvm-agent-ctl: the command was killed by signal {sig}");
    }
    Ok(remote_status(last.exit_code, last.signal))
}

fn guest_path(spec: &str) -> Option<&str> {
    spec.strip_prefix("guest:")
}

fn file_name(guest: &str) -> Option<&str> {
    guest
        .rsplit(['/', '\\'])
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

async fn cp(client: &Client, args: CpArgs, json: bool) -> Outcome {
    match (guest_path(&args.src), guest_path(&args.dst)) {
        (Some(_), Some(_)) | (None, None) => Err(Failure::Usage(
            "cp needs exactly one side of the form guest:/PATH".into(),
        )),
        (None, Some(guest)) if args.src != "-" => {
            transfer::upload(client, &args, guest, json).await
        }
        (Some(guest), None) if args.dst != "-" => {
            transfer::download(client, &args, guest, json).await
        }
        (None, Some(guest)) => {
            let content = if args.src == "-" {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
                buf
            } else {
                std::fs::read(&args.src)
                    .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", args.src)))?
            };
            let sha256 = codec::sha256_hex(&content);
            let params = CopyToGuestParams {
                path: guest.to_owned(),
                content_base64: codec::base64_encode(&content),
                overwrite: args.overwrite,
                mode: args.mode,
                create_parents: args.parents,
                sha256: Some(sha256.clone()),
                uid: None,
                gid: None,
            };
            let r = client.copy_to_guest(&params).await?;
            if r.sha256 != sha256 || r.size != content.len() as u64 {
                return Err(Failure::Protocol(format!(
                    "the agent reports {} bytes with sha256 {}, but {} bytes with sha256 {sha256} were sent",
                    r.size,
                    r.sha256,
                    content.len()
                )));
            }
            if json {
                let v = serde_json::to_value(&r).map_err(|e| Failure::Protocol(e.to_string()))?;
                print_json(&v);
            } else {
                println!(
                    "{} -> guest:{}: {} bytes, sha256 {}",
                    args.src, r.path, r.size, r.sha256
                );
            }
            Ok(EXIT_OK)
        }
        (Some(guest), None) => {
            let dest = if args.dst == "-" {
                None
            } else {
                let mut p = PathBuf::from(&args.dst);
                if p.is_dir() || args.dst.ends_with('/') {
                    let name = file_name(guest).ok_or_else(|| {
                        Failure::Usage(format!("guest:{guest} names no file to copy"))
                    })?;
                    p = p.join(name);
                }
                if p.exists() && !args.overwrite {
                    return Err(Failure::Usage(format!(
                        "{} exists; pass --overwrite to replace it",
                        p.display()
                    )));
                }
                Some(p)
            };
            let r = client
                .copy_from_guest(&CopyFromGuestParams {
                    path: guest.to_owned(),
                })
                .await?;
            let content = codec::base64_decode(&r.content_base64)
                .map_err(|e| Failure::Protocol(format!("the agent sent bad base64: {e}")))?;
            let sha256 = codec::sha256_hex(&content);
            if sha256 != r.sha256 || content.len() as u64 != r.size {
                return Err(Failure::Protocol(format!(
                    "received {} bytes with sha256 {sha256}, but the agent announced {} bytes with sha256 {}",
                    content.len(),
                    r.size,
                    r.sha256
                )));
            }
            match &dest {
                None => {
                    let mut stdout = std::io::stdout().lock();
                    stdout
                        .write_all(&content)
                        .and_then(|()| stdout.flush())
                        .map_err(|e| Failure::Usage(format!("cannot write output: {e}")))?;
                }
                Some(p) => {
                    write_local(p, &content)?;
                    if json {
                        print_json(&serde_json::json!({
                            "path": p, "size": r.size, "sha256": r.sha256
                        }));
                    } else {
                        println!(
                            "guest:{guest} -> {}: {} bytes, sha256 {}",
                            p.display(),
                            r.size,
                            r.sha256
                        );
                    }
                }
            }
            Ok(EXIT_OK)
        }
    }
}

/// Write through a temporary file in the same directory, then rename, so a
/// failed copy never leaves a half-written destination.
fn write_local(path: &Path, content: &[u8]) -> Result<(), Failure> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.kvm-agent-ctl.{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let result = std::fs::write(&tmp, content).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Failure::Usage(format!(
            "cannot write {}: {e}",
            path.display()
        )));
    }
    Ok(())
}

async fn power(client: &Client, action: PowerAction, args: PowerArgs, json: bool) -> Outcome {
    let params = PowerParams {
        force: args.force,
        confirm: args.yes,
        delay_seconds: args.delay,
        message: args.message,
    };
    let r = match action {
        PowerAction::Shutdown => client.shutdown(&params).await?,
        PowerAction::Reboot => client.reboot(&params).await?,
    };
    if json {
        let v = serde_json::to_value(&r).map_err(|e| Failure::Protocol(e.to_string()))?;
        print_json(&v);
    } else {
        let what = match r.action {
            PowerAction::Shutdown => "shutdown",
            PowerAction::Reboot => "reboot",
        };
        let force = if r.force { " (forced)" } else { "" };
        println!("{what}{force} accepted: in {} s", r.delay_seconds);
    }
    Ok(EXIT_OK)
}

async fn call(client: &Client, method: &str, params: Option<&str>, json: bool) -> Outcome {
    let params = match params {
        None => None,
        Some(text) => {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| Failure::Usage(format!("JSON_PARAMS is not valid JSON: {e}")))?;
            if !(v.is_object() || v.is_array()) {
                return Err(Failure::Usage(
                    "JSON_PARAMS must be a JSON object or array".into(),
                ));
            }
            Some(v)
        }
    };
    let result = client.call_raw(method, params).await?;
    if json {
        println!("{result}");
    } else {
        print_json(&result);
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_exec_with_options_and_trailing_command() {
        let cli = Cli::try_parse_from([
            "kvm-agent-ctl",
            "--connect",
            "unix:/tmp/a.sock",
            "exec",
            "--timeout",
            "500",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--",
            "ls",
            "-la",
            "/",
        ])
        .unwrap();
        let Command::Exec(args) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(args.timeout_ms, Some(500));
        assert_eq!(
            args.env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(args.argv, ["ls", "-la", "/"]);
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["kvm-agent-ctl", "caps", "--json", "-c", "vsock:3:1024"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.connect, Some(Target::Vsock { cid: 3, port: 1024 }));
    }

    #[test]
    fn bad_target_is_a_usage_error() {
        let e = Cli::try_parse_from(["kvm-agent-ctl", "-c", "tcp:1.2.3.4:5", "ping"]).unwrap_err();
        assert_eq!(e.exit_code(), i32::from(EXIT_USAGE));
    }

    #[test]
    fn remote_status_follows_shell_conventions() {
        assert_eq!(remote_status(Some(0), None), 0);
        assert_eq!(remote_status(Some(3), None), 3);
        assert_eq!(remote_status(Some(256 + 7), None), 7);
        assert_eq!(remote_status(None, Some(9)), 137);
        assert_eq!(remote_status(None, Some(15)), 143);
    }

    #[test]
    fn small_parsers() {
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert_eq!(parse_mode("0o755"), Ok(0o755));
        assert!(parse_mode("9").is_err());
        assert!(parse_env("=x").is_err());
        assert!(parse_secs("0").is_err());
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(file_name("/var/log/app.log"), Some("app.log"));
        assert_eq!(file_name("/var/log/"), None);
    }

    #[test]
    fn exit_codes_for_client_errors() {
        use kvm_agent_client::protocol::ErrorObject;
        let agent = Failure::Client(ClientError::Agent(ErrorObject::new(
            ErrorCode::NotImplemented,
        )));
        assert_eq!(report(&agent, true), EXIT_AGENT);
        let lost = Failure::Client(ClientError::Disconnected("eof".into()));
        assert_eq!(report(&lost, false), EXIT_CONNECTION);
        let bad = Failure::Client(ClientError::Protocol("x".into()));
        assert_eq!(report(&bad, false), EXIT_PROTOCOL);
        let big = Failure::Client(ClientError::RequestTooLarge { len: 9, max: 4 });
        assert_eq!(report(&big, false), EXIT_USAGE);
    }
}
