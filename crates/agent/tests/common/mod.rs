//! Runs the real agent binary on a unix socket in a scratch directory (on
//! Windows: on a named pipe of a unique name) and talks raw frames to it.

#![allow(dead_code)] // each test file uses a different part

use std::io::{Read, Write};
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
#[cfg(unix)]
use std::process::ExitStatus;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Upper bound for anything to happen; tests never assert on durations, this
/// only turns a hang into a failure.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The byte stream to the agent: a unix socket, or on Windows a named pipe
/// opened as a file.
#[cfg(unix)]
pub type Stream = UnixStream;
/// The byte stream to the agent: a unix socket, or on Windows a named pipe
/// opened as a file.
#[cfg(windows)]
pub type Stream = std::fs::File;

/// Where an agent of this scratch directory listens: `NAME.sock` in it, or
/// on Windows a named pipe whose name is unique to the directory.
pub fn endpoint(scratch: &Scratch, name: &str) -> PathBuf {
    if cfg!(windows) {
        let dir = scratch.0.file_name().unwrap_or_default().to_string_lossy();
        PathBuf::from(format!(r"\\.\pipe\{dir}-{name}"))
    } else {
        scratch.0.join(format!("{name}.sock"))
    }
}

/// The `--transport` value for an [`endpoint`].
pub fn transport(endpoint: &Path) -> String {
    if cfg!(windows) {
        format!("pipe:{}", endpoint.display())
    } else {
        format!("unix:{}", endpoint.display())
    }
}

/// A path as a TOML literal string (Windows paths hold backslashes, which
/// a basic string would take for escapes).
pub fn toml_path(path: &Path) -> String {
    format!("'{}'", path.display())
}

/// Open a connection to an agent's endpoint, without waiting.
pub fn open_stream(endpoint: &Path) -> std::io::Result<Stream> {
    #[cfg(unix)]
    {
        UnixStream::connect(endpoint)
    }
    #[cfg(windows)]
    {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(endpoint)
    }
}

/// Open a connection to an agent's endpoint. On Windows, retry while every
/// instance of the pipe is busy: the agent creates the next one just after
/// a client connects. Reads time out after [`PATIENCE`] on unix only: a
/// pipe opened as a file has no read timeout, so on Windows a hang shows as
/// a test that does not finish.
pub fn connect_stream(endpoint: &Path) -> Stream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match open_stream(endpoint) {
            Ok(s) => {
                #[cfg(unix)]
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                return s;
            }
            // ERROR_PIPE_BUSY
            Err(e) if cfg!(windows) && e.raw_os_error() == Some(231) => {
                assert!(Instant::now() < deadline, "the agent's pipe stayed busy");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("connect to the agent: {e}"),
        }
    }
}

/// Wait until the agent listens on `endpoint`: its socket file exists, or
/// on Windows its pipe accepts a connection (closed at once).
fn wait_for_endpoint(child: &mut Child, endpoint: &Path) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ready = if cfg!(windows) {
            open_stream(endpoint).is_ok()
        } else {
            endpoint.exists()
        };
        if ready {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the agent exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the agent never created its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kva-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn agent_binary() -> &'static str {
    env!("CARGO_BIN_EXE_kvm-manager-agent")
}

/// The agent, killed on drop.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub scratch: Scratch,
}

impl Agent {
    /// Start with this configuration text (written to a file the agent
    /// reads). Unless it has an `[audit]` section, the audit trail goes to
    /// `audit.jsonl` in the scratch directory.
    pub fn start(config: &str) -> Self {
        Self::start_with(config, |_| {})
    }

    /// Like [`Agent::start`], with `setup` applied to the agent's command
    /// before it is spawned (extra environment, resource limits).
    pub fn start_with(config: &str, setup: impl FnOnce(&mut Command)) -> Self {
        let scratch = Scratch::new("agent");
        let socket = endpoint(&scratch, "agent");
        let config_path = scratch.0.join("config.toml");
        let mut config = config.to_owned();
        if !config.contains("[audit]") {
            // Keep the trail in the scratch directory, not on stderr.
            config.push_str(&format!(
                "\n[audit]\ndestination = \"none\"\njsonl_path = {}\n",
                toml_path(&scratch.0.join("audit.jsonl"))
            ));
        }
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = command(&config_path, &socket);
        setup(&mut cmd);
        let child = cmd.spawn().expect("start the agent");
        let mut agent = Agent {
            child,
            socket,
            scratch,
        };
        agent.wait_for_socket();
        agent
    }

    /// Stop the agent with SIGTERM and start a new one on the same socket
    /// with the same configuration. Returns the old one's exit status.
    #[cfg(unix)]
    pub fn restart(&mut self) -> ExitStatus {
        let status = self.signal_and_wait();
        self.child = spawn(&self.scratch.0.join("config.toml"), &self.socket);
        self.wait_for_socket();
        status
    }

    fn wait_for_socket(&mut self) {
        wait_for_endpoint(&mut self.child, &self.socket);
    }

    /// A new connection, past its `agent_ready`.
    pub fn connect(&self) -> Conn {
        let mut c = Conn::open(&self.socket);
        let ready = c.recv();
        assert_eq!(ready["method"], "agent_ready", "first frame: {ready}");
        c
    }

    /// Send SIGTERM and wait for the exit status.
    #[cfg(unix)]
    pub fn terminate(mut self) -> ExitStatus {
        self.signal_and_wait()
    }

    #[cfg(unix)]
    fn signal_and_wait(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the agents of these tests record shutdown and reboot: they never
/// power off or restart the machine running the tests.
pub fn power_log(config: &Path) -> PathBuf {
    config.with_file_name("power.log")
}

#[cfg(unix)]
fn spawn(config: &Path, socket: &Path) -> Child {
    command(config, socket).spawn().expect("start the agent")
}

fn command(config: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.env("KVA_POWER_DRY_RUN", power_log(config))
        .arg("--config")
        .arg(config)
        .arg("--transport")
        .arg(transport(socket))
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// A raw connection speaking frames.
pub struct Conn {
    pub stream: Stream,
}

impl Conn {
    pub fn open(path: &Path) -> Self {
        Conn {
            stream: connect_stream(path),
        }
    }

    /// Send one frame with this body.
    pub fn send(&mut self, body: &[u8]) {
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(body);
        self.stream.write_all(&framed).unwrap();
    }

    /// Send raw bytes, no framing.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Receive one frame's body.
    pub fn recv_bytes(&mut self) -> Vec<u8> {
        let mut header = [0u8; 4];
        self.stream
            .read_exact(&mut header)
            .expect("a frame header from the agent");
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        self.stream
            .read_exact(&mut body)
            .expect("a frame body from the agent");
        body
    }

    /// Receive one frame as JSON.
    pub fn recv(&mut self) -> Value {
        serde_json::from_slice(&self.recv_bytes()).expect("the agent sends JSON")
    }

    /// Round trip a request body.
    pub fn call(&mut self, body: &str) -> Value {
        self.send(body.as_bytes());
        self.recv()
    }

    /// Whether the agent closed the connection (reads EOF).
    pub fn closed_by_agent(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            // A named pipe whose server closed reads ERROR_BROKEN_PIPE.
            Err(e) => cfg!(windows) && e.kind() == std::io::ErrorKind::BrokenPipe,
            Ok(_) => false,
        }
    }

    /// Ping with a distinctive id; the very next frame must be its answer.
    pub fn assert_ping_is_next(&mut self) {
        let reply = self.call(r#"{"jsonrpc":"2.0","id":"after","method":"ping"}"#);
        assert_eq!(
            reply,
            serde_json::json!({"jsonrpc":"2.0","id":"after","result":{}}),
            "the next frame after a bad one must be the ping answer"
        );
    }
}

/// The error code of a response.
pub fn error_code(reply: &Value) -> i64 {
    reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error reply: {reply}"))
}

/// `s` as base64 (qemu-ga's `buf-b64`, `input-data`).
pub fn b64(s: &str) -> String {
    kvm_agent_protocol::codec::base64_encode(s.as_bytes())
}

/// A base64 JSON string's text.
pub fn unb64(v: &Value) -> String {
    String::from_utf8(
        kvm_agent_protocol::codec::base64_decode(v.as_str().unwrap().as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A connection in qemu-guest-agent's protocol, reading newline-ended replies (0xFF bytes kept, at the
/// start of the reply they precede).
pub struct QgaConn {
    pub s: Stream,
    buf: Vec<u8>,
}

impl QgaConn {
    pub fn open(path: &Path) -> Self {
        QgaConn {
            s: connect_stream(path),
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// The next reply line, raw (without its newline).
    pub fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return line[..line.len() - 1].to_vec();
            }
            let mut chunk = [0u8; 65536];
            let n = self
                .s
                .read(&mut chunk)
                .expect("a reply before the patience ran out");
            assert!(n > 0, "the agent closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next reply as JSON, with whether 0xFF preceded it.
    pub fn reply(&mut self) -> (bool, Value) {
        let line = self.line();
        let delimited = line.first() == Some(&0xFF);
        let text: Vec<u8> = line.into_iter().filter(|b| *b != 0xFF).collect();
        let v = serde_json::from_slice(&text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&text)));
        (delimited, v)
    }

    pub fn call(&mut self, request: &str) -> Value {
        self.send(request.as_bytes());
        self.reply().1
    }

    /// Poll `guest-exec-status` for `pid` until it says the process
    /// exited; its `return`. Until then the answer must be exactly
    /// `{"exited": false}`.
    pub fn wait_exited(&mut self, pid: i64) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.call(&format!(
                r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#
            ));
            if s["return"]["exited"] == serde_json::json!(true) {
                return s["return"].clone();
            }
            assert_eq!(s["return"], serde_json::json!({"exited": false}), "{s}");
            assert!(Instant::now() < deadline, "{pid} never exited: {s}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resynchronise as hosts do: 0xFF, then guest-sync-delimited, and
    /// skip everything up to its answer.
    pub fn resync(&mut self, id: i64) {
        self.send(&[0xFF]);
        self.send(
            format!(r#"{{"execute":"guest-sync-delimited","arguments":{{"id":{id}}}}}"#).as_bytes(),
        );
        loop {
            let (delimited, v) = self.reply();
            if delimited && v["return"] == serde_json::json!(id) {
                return;
            }
        }
    }
}

/// The agent serving qemu-guest-agent's protocol on `qga.sock` (and its
/// own on `agent.sock`) in a scratch directory, killed on drop. Unless the
/// configuration has an `[audit]` section, the trail goes to `audit.jsonl`.
pub struct QgaAgent {
    pub child: Child,
    pub socket: PathBuf,
    pub scratch: Scratch,
}

impl QgaAgent {
    /// `{scratch}` in `config` stands for the scratch directory (a TOML
    /// string).
    pub fn start(config: &str) -> Self {
        let scratch = Scratch::new("qga-agent");
        let socket = endpoint(&scratch, "qga");
        let config_path = scratch.0.join("config.toml");
        let mut config = config.replace("{scratch}", &toml_path(&scratch.0));
        if !config.contains("[audit]") {
            config.push_str(&format!(
                "\n[audit]\ndestination = \"none\"\njsonl_path = {}\n",
                toml_path(&scratch.0.join("audit.jsonl"))
            ));
        }
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(agent_binary())
            .env("KVA_POWER_DRY_RUN", power_log(&config_path))
            .arg("--config")
            .arg(&config_path)
            .arg("--transport")
            .arg(transport(&endpoint(&scratch, "agent")))
            .arg("--qga-transport")
            .arg(transport(&socket))
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the agent");
        wait_for_endpoint(&mut child, &socket);
        QgaAgent {
            child,
            socket,
            scratch,
        }
    }

    pub fn connect(&self) -> QgaConn {
        QgaConn::open(&self.socket)
    }

    /// Wait until the power handler has recorded `line` (`reboot
    /// force=false`) in its dry-run log.
    pub fn wait_for_power_record(&self, line: &str) {
        let log = power_log(&self.scratch.0.join("config.toml"));
        let deadline = Instant::now() + PATIENCE;
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(line)
        {
            assert!(
                Instant::now() < deadline,
                "the power action {line:?} was never recorded"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The trail so far has `guest-exec` of `argv` denied, and every record
    /// is marked as qemu-ga's protocol.
    pub fn assert_exec_denied_in_trail(&self, argv: Value) {
        let trail = self.audit();
        let denied = trail
            .iter()
            .find(|r| r["method"] == "guest-exec" && r["decision"] == "denied")
            .unwrap_or_else(|| panic!("{trail:?}"));
        assert_eq!(denied["details"]["argv"], argv, "{denied}");
        assert!(
            trail.iter().all(|r| r["details"]["protocol"] == "qga"),
            "{trail:?}"
        );
    }

    /// The audit records written so far.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.scratch.0.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for QgaAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent allowed to transfer files in `root` only (its own scratch
/// directory, never the shared /tmp), with `extra` configuration after the
/// `[security]` line.
pub struct FileFixture {
    pub agent: Agent,
    pub root: PathBuf,
    _scratch: Scratch,
}

pub fn file_fixture(tag: &str, extra: &str) -> FileFixture {
    let scratch = Scratch::new(tag);
    let root = scratch.0.join("root");
    std::fs::create_dir(&root).unwrap();
    let agent = Agent::start(&format!(
        "[security]\nallowed_file_paths = [{}]\n{extra}",
        toml_path(&root)
    ));
    FileFixture {
        agent,
        root,
        _scratch: scratch,
    }
}
