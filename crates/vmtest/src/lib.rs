//! VM test harness: boots real guests under QEMU (TCG) and talks to the agent
//! inside them through the real client library, [`kvm_agent_client`].
//!
//! # Running
//!
//! The tests need images that `cargo xtask vm-test` builds (and caches); it
//! then runs them with the images' paths in `KVA_VM_*` variables:
//!
//! ```text
//! cargo xtask vm-test                       # every VM test
//! cargo xtask vm-test late_device           # tests whose name contains "late_device"
//! cargo xtask vm-test -- --nocapture        # extra arguments go to the test binaries
//! ```
//!
//! To run one test by hand, again and again without the image step:
//!
//! ```text
//! eval "$(cargo xtask vm-test --env | grep '^export KVA_VM_')"   # KVA_VM_QEMU, ...
//! cargo test -p kvm-agent-vmtest --test virtio_serial -- late_device --nocapture
//! ```
//!
//! Without those variables every test fails at once saying so: the tests never
//! pass without booting a guest. The plain `cargo test --workspace` step of
//! `cargo xtask test` leaves this crate out; its own `vm` step runs it.
//!
//! # Where things are
//!
//! - Images: `$XDG_CACHE_HOME/kvm-manager-agent` (else
//!   `$HOME/.cache/kvm-manager-agent`): `kernel/<package>/vmlinux`, the
//!   modules, `initramfs/initramfs-<hash>.cpio`. The static agent is built in
//!   `target/static`. The guest's `/init` is `xtask/src/vm/init.sh`; it reads
//!   `kva.*` parameters from the kernel command line (see [`GuestConfig`]).
//! - Logs: `target/vmtest/<test>/` (`KVA_VM_LOG_DIR`): `console.log` (the
//!   guest's ttyS0: kernel, init and the agent's own log), `qemu.log` (QEMU's
//!   stderr), `vhost-device-vsock.log`. A failing test prints the console log's
//!   path and its last lines.
//! - libvirt (tests/libvirt_qga.rs): a private libvirtd and its domain, see
//!   [`libvirt`]; its logs (`libvirtd.log`, `qemu-domain.log`, `domain.xml`,
//!   `console.log`) go to the same `target/vmtest/<test>/`.
//! - Sockets (QMP, the virtio-serial chardev, vhost-user, the hybrid vsock) go
//!   to a short-lived folder under the system temporary folder (unix socket
//!   paths are limited to 108 bytes), removed when the guest is dropped.
//!
//! # Rules the harness keeps
//!
//! - Every wait is for an event (a console line, a QMP event, an answer) and
//!   is bounded by [`TIMEOUT`]; a hang becomes a failure that names what was
//!   awaited. The only timed waits are CPU samples, which the guest prints
//!   once a second.
//! - QEMU and vhost-device-vsock are killed when the [`Vm`] is dropped, on
//!   every exit path including a failed assertion, and get `SIGKILL` if the
//!   test process dies first (`PR_SET_PDEATHSIG`).
//! - At most [`MAX_GUESTS`] guests run at once in one test process (a global
//!   semaphore taken by [`Vm::boot`]); the test binaries run one after the
//!   other, so that holds for the whole run.
//! - The accelerator comes from `KVA_VM_ACCEL` (`kvm` or `tcg`; unset:
//!   `tcg`). `cargo xtask vm-test` sets it from a probe it runs once per
//!   host boot (`auto`: KVM only when `/dev/kvm` opens and a probe guest
//!   reaches its /init under `-accel kvm` within seconds; see
//!   xtask/src/vm/accel.rs). On the project's machines `/dev/kvm` exists but
//!   cannot boot Debian's kernel, so the probe picks TCG.
//!
//! # The guest's CPU meter
//!
//! The guest's init prints `KVA-CPU <ticks> fds=<n> rss_kib=<kib>` every
//! second: utime + stime of the agent process from `/proc/PID/stat`, in
//! clock ticks (100 a second), its open descriptors (`/proc/PID/fd`) and its
//! resident memory (`VmRSS`). A test reads the agent's CPU time, descriptors
//! and memory inside the guest from that, with no agent method involved: see
//! [`Vm::cpu_window`] and [`Console::next_stat`].

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub mod debian;
pub mod libvirt;

use kvm_agent_client::{Client, ClientOptions, Target};
use serde_json::{json, Value};

/// Bound of every wait: generous, since TCG on a busy 2-core machine is slow.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// Guests running at once in one test process.
pub const MAX_GUESTS: usize = 2;
/// The agent's virtio-serial port name.
pub const PORT_NAME: &str = "org.kvmmanager.agent.0";
/// The agent's default vsock port.
pub const VSOCK_PORT: u32 = 7789;
/// The guest's vsock context id.
pub const GUEST_CID: u32 = 4;
/// The QEMU id of the virtserialport device (named in `VSERPORT_CHANGE`).
const PORT_ID: &str = "kvaport";
/// qemu-guest-agent's virtio-serial port name ([`GuestConfig::qemu_ga`]).
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// The QEMU id of qemu-guest-agent's virtserialport device.
const QGA_PORT_ID: &str = "qgaport";

/// Paths from `cargo xtask vm-test`.
#[derive(Debug, Clone)]
pub struct Images {
    pub qemu: PathBuf,
    pub vhost_device_vsock: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub log_dir: PathBuf,
}

impl Images {
    /// Read the `KVA_VM_*` variables; panics (fails the test) when one is
    /// missing or names nothing.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            let value = std::env::var_os(name).unwrap_or_else(|| {
                panic!(
                    "{name} is not set: the VM tests need the images that \
                     `cargo xtask vm-test` builds (see this crate's doc to run a test by hand)"
                )
            });
            PathBuf::from(value)
        };
        let existing = |name: &str| {
            let path = var(name);
            assert!(
                path.exists(),
                "{name}={} does not exist (run `cargo xtask vm-test`)",
                path.display()
            );
            path
        };
        Self {
            qemu: existing("KVA_VM_QEMU"),
            vhost_device_vsock: existing("KVA_VM_VHOST_DEVICE_VSOCK"),
            kernel: existing("KVA_VM_KERNEL"),
            initramfs: existing("KVA_VM_INITRAMFS"),
            log_dir: var("KVA_VM_LOG_DIR"),
        }
    }
}

/// What a guest has and what its init does (passed as `kva.*` kernel
/// parameters to `/init`).
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The agent's transports, comma-separated (`kva.agent`).
    pub agent: &'static str,
    /// Modules loaded after the agent started (`kva.late`), so that their
    /// devices appear while it runs. Empty: none.
    pub late: &'static str,
    /// Seconds between starting the agent and loading `late` (`kva.late_after`).
    pub late_after_seconds: u32,
    /// The agent's log level (`kva.log`).
    pub log_level: &'static str,
    /// A virtio-serial controller with the agent's port on a unix chardev socket.
    pub virtio_serial: bool,
    /// A vhost-user-vsock device served by vhost-device-vsock.
    pub vsock: bool,
    /// Let a guest reboot restart it (QEMU's default); when false, QEMU runs
    /// with `-no-reboot` and exits instead.
    pub reboot: bool,
    /// With `virtio_serial`: the agent's port exists at boot. When false the
    /// guest has only the virtio-serial controller; [`Vm::hotplug_port`]
    /// adds the port later.
    pub port_at_boot: bool,
    /// The agent's configuration, one of those baked into the initramfs
    /// (`kva.config`, xtask/src/vm/configs/NAME.toml). Empty: built-in defaults.
    pub agent_config: &'static str,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// A tmpfs of this many MiB on the guest's /tmp (`kva.tmp_mib`); 0: /tmp
    /// stays on the initramfs.
    pub tmp_mib: u32,
    /// With `virtio_serial`: also qemu-guest-agent's port,
    /// [`QGA_PORT_NAME`], on its own chardev socket ([`Vm::qga_socket`]),
    /// for the agent's QGA front end.
    pub qga_port: bool,
    /// Also run qemu-guest-agent in the guest, on a second virtio-serial
    /// port named [`QGA_PORT_NAME`] (host end: [`Vm::qga_socket`]), with
    /// these RPCs blocked (`-b`, comma-separated; `kva.qga_block`). Needs
    /// an initramfs with qemu-ga in it (`cargo xtask bench` builds one);
    /// the guest's /init says `KVA-QGA-PID` once it runs it. None: no
    /// qemu-ga (the default).
    pub qemu_ga: Option<&'static str>,
}

impl Default for GuestConfig {
    /// The agent on virtio-serial, started before virtio_console is loaded.
    fn default() -> Self {
        Self {
            agent: "virtio-serial",
            late: "virtio_console",
            late_after_seconds: 1,
            log_level: "debug",
            virtio_serial: true,
            vsock: false,
            reboot: false,
            port_at_boot: true,
            agent_config: "",
            memory_mib: 256,
            tmp_mib: 0,
            qga_port: false,
            qemu_ga: None,
        }
    }
}

// ---------------------------------------------------------------------------
// Guest slots

static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

struct Slot;

impl Slot {
    fn take() -> Self {
        let (lock, cond) = &SLOTS;
        let mut used = lock_ignoring_poison(lock);
        while *used >= MAX_GUESTS {
            used = cond.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (lock, cond) = &SLOTS;
        *lock_ignoring_poison(lock) -= 1;
        cond.notify_one();
    }
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Console

/// The guest's serial console: every line, as it arrives, also written to
/// `console.log`.
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    state: Mutex<ConsoleState>,
    cond: Condvar,
    started: Instant,
}

#[derive(Debug, Default)]
struct ConsoleState {
    /// Complete lines, with the time they arrived.
    lines: Vec<(Duration, String)>,
    /// QEMU closed its standard output (it exited).
    closed: bool,
}

/// Why the agent looks for its missing virtio-serial port again (in its
/// debug line) when its safety-net timer fired rather than an event.
pub const RESCAN_REASON: &str = "(safety net:";

/// A position in the console's lines: waits look at lines from there on.
pub type Mark = usize;

impl Console {
    fn start(path: PathBuf, mut out: impl Read + Send + 'static) -> Arc<Self> {
        let console = Arc::new(Self {
            path,
            state: Mutex::new(ConsoleState::default()),
            cond: Condvar::new(),
            started: Instant::now(),
        });
        let c = console.clone();
        std::thread::spawn(move || {
            let mut log = File::create(&c.path).ok();
            let mut buf = [0u8; 4096];
            let mut partial = Vec::new();
            loop {
                let n = match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(log) = log.as_mut() {
                    let _ = log.write_all(&buf[..n]);
                }
                partial.extend_from_slice(&buf[..n]);
                let mut state = lock_ignoring_poison(&c.state);
                while let Some(end) = partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    state.lines.push((c.started.elapsed(), line));
                }
                drop(state);
                c.cond.notify_all();
            }
            let mut state = lock_ignoring_poison(&c.state);
            if !partial.is_empty() {
                let line = String::from_utf8_lossy(&partial).into_owned();
                state.lines.push((c.started.elapsed(), line));
            }
            state.closed = true;
            drop(state);
            c.cond.notify_all();
        });
        console
    }

    /// The console log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The position after the last line received so far.
    pub fn mark(&self) -> Mark {
        lock_ignoring_poison(&self.state).lines.len()
    }

    /// The lines from `from` on, as received so far.
    pub fn lines_since(&self, from: Mark) -> Vec<String> {
        let state = lock_ignoring_poison(&self.state);
        state.lines[from.min(state.lines.len())..]
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let len = self.mark();
        self.lines_since(len.saturating_sub(n))
    }

    /// Wait for the first line at or after `from` for which `f` says
    /// something; returns the position after it and what `f` said. Panics
    /// after [`TIMEOUT`], when QEMU has exited, or when the agent has exited.
    pub fn wait_for<T>(
        &self,
        from: Mark,
        what: &str,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> (Mark, T) {
        let deadline = Instant::now() + TIMEOUT;
        let mut next = from;
        let mut state = lock_ignoring_poison(&self.state);
        loop {
            while next < state.lines.len() {
                let line = &state.lines[next].1;
                next += 1;
                if let Some(t) = f(line) {
                    return (next, t);
                }
                if line.contains("KVA-AGENT-EXITED") {
                    panic!("the agent exited while waiting for {what}: {line:?}");
                }
            }
            if state.closed {
                panic!("QEMU exited (console closed) while waiting for {what}");
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("timed out after {TIMEOUT:?} waiting for {what} on the guest console");
            }
            state = self
                .cond
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Wait for a line containing `needle`; returns the position after it.
    pub fn wait_contains(&self, from: Mark, needle: &str) -> Mark {
        self.wait_for(from, &format!("a line containing {needle:?}"), |l| {
            l.contains(needle).then_some(())
        })
        .0
    }

    /// Wait for the agent to open its virtio-serial port, at or after
    /// `from`, and check that it found the port through an event (a change
    /// in /dev, or a port's name arriving), not by its 30 s safety-net
    /// rescan. The agent says why it looks again each time (at debug
    /// level); the last such line before "opened" must not be
    /// [`RESCAN_REASON`]. No clock is involved, so a slow guest cannot fail
    /// this. Returns the position after the "opened" line.
    pub fn wait_port_found_by_event(&self, from: Mark) -> Mark {
        let opened = self.wait_contains(from, "opened virtio-serial port /dev/vport");
        assert!(
            self.lines_since(0)
                .iter()
                .any(|l| l.contains("KVA-INIT agent=") && l.contains("log=debug")),
            "the agent must log at debug level for this check (GuestConfig::log_level)"
        );
        let lines = &self.lines_since(from)[..opened - from];
        let last_look = lines
            .iter()
            .rev()
            .find(|l| l.contains("looking for virtio-serial port"));
        assert!(
            !last_look.is_some_and(|l| l.contains(RESCAN_REASON)),
            "the agent found its port only when its safety-net timer fired, not through \
             an event: {last_look:?}"
        );
        opened
    }

    /// Wait for the next `KVA-CPU <ticks>` sample at or after `from`.
    pub fn next_cpu_sample(&self, from: Mark) -> (Mark, u64) {
        self.wait_for(from, "a KVA-CPU sample", parse_cpu_sample)
    }

    /// Wait for the next full `KVA-CPU` line (ticks, descriptors, memory) at
    /// or after `from`.
    pub fn next_stat(&self, from: Mark) -> (Mark, AgentStat) {
        self.wait_for(from, "a KVA-CPU line with fds and rss", parse_stat)
    }
}

/// `KVA-CPU 123` anywhere in a line (kernel messages may share it).
pub fn parse_cpu_sample(line: &str) -> Option<u64> {
    let rest = &line[line.find("KVA-CPU ")? + "KVA-CPU ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What the guest's init reports about the agent once a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentStat {
    /// utime + stime, clock ticks.
    pub ticks: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Resident memory (VmRSS), KiB.
    pub rss_kib: u64,
}

/// `KVA-CPU 12 fds=9 rss_kib=5120` anywhere in a line.
pub fn parse_stat(line: &str) -> Option<AgentStat> {
    let ticks = parse_cpu_sample(line)?;
    let rest = &line[line.find("KVA-CPU ")?..];
    let field = |name: &str| -> Option<u64> {
        let v = rest.split_whitespace().find_map(|w| w.strip_prefix(name))?;
        v.parse().ok()
    };
    Some(AgentStat {
        ticks,
        fds: field("fds=")?,
        rss_kib: field("rss_kib=")?,
    })
}

/// The accelerator for QEMU's `-accel`: `KVA_VM_ACCEL` (`kvm` or `tcg`,
/// resolved by xtask's probe); unset or anything else: `tcg`.
pub fn accel() -> &'static str {
    match std::env::var("KVA_VM_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        _ => "tcg",
    }
}

// ---------------------------------------------------------------------------
// QMP

/// A QMP connection: commands and answers, and every event since connecting.
#[derive(Debug)]
struct Qmp {
    writer: Mutex<UnixStream>,
    state: Arc<(Mutex<QmpState>, Condvar)>,
}

#[derive(Debug, Default)]
struct QmpState {
    events: Vec<Value>,
    answers: std::collections::VecDeque<Value>,
    closed: bool,
}

impl Qmp {
    fn connect(path: &Path, qemu: &mut Child) -> Self {
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(status)) = qemu.try_wait() {
                        panic!("QEMU exited ({status}) before its QMP socket was up: see qemu.log");
                    }
                    assert!(
                        Instant::now() < deadline,
                        "QMP socket {} not up after {TIMEOUT:?}: {e}",
                        path.display()
                    );
                    // The socket appears within milliseconds of QEMU starting.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let state = Arc::new((Mutex::new(QmpState::default()), Condvar::new()));
        let reader = BufReader::new(stream.try_clone().expect("clone the QMP socket"));
        let s = state.clone();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let mut st = lock_ignoring_poison(&s.0);
                if msg.get("event").is_some() {
                    st.events.push(msg);
                } else if msg.get("return").is_some() || msg.get("error").is_some() {
                    st.answers.push_back(msg);
                }
                drop(st);
                s.1.notify_all();
            }
            lock_ignoring_poison(&s.0).closed = true;
            s.1.notify_all();
        });
        let qmp = Self {
            writer: Mutex::new(stream),
            state,
        };
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    /// Run one command and return its `return` value (panics on `error`).
    fn execute(&self, command: &str, arguments: Value) -> Value {
        let msg = json!({ "execute": command, "arguments": arguments });
        {
            let mut w = lock_ignoring_poison(&self.writer);
            writeln!(w, "{msg}").expect("write to QMP");
        }
        let answer = self.wait(&format!("the answer to QMP {command}"), |st| {
            st.answers.pop_front()
        });
        match answer.get("return") {
            Some(r) => r.clone(),
            None => panic!("QMP {command} failed: {answer}"),
        }
    }

    fn wait<T>(&self, what: &str, mut f: impl FnMut(&mut QmpState) -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        let mut st = lock_ignoring_poison(&self.state.0);
        loop {
            if let Some(t) = f(&mut st) {
                return t;
            }
            assert!(
                !st.closed,
                "QMP closed (QEMU exited) while waiting for {what}"
            );
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out after {TIMEOUT:?} waiting for {what}"
            );
            st = self
                .state
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

// ---------------------------------------------------------------------------
// The guest

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A running guest; QEMU (and vhost-device-vsock) die when it is dropped.
#[derive(Debug)]
pub struct Vm {
    name: String,
    log_dir: PathBuf,
    sock_dir: PathBuf,
    qemu: Child,
    vhost: Option<Child>,
    console: Arc<Console>,
    qmp: Qmp,
    booted: Instant,
    _slot: Slot,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

impl Vm {
    /// Boot a guest for the test `name` (its logs go to `target/vmtest/<name>/`).
    /// Waits for a free guest slot first.
    pub fn boot(name: &str, config: GuestConfig) -> Self {
        let images = Images::from_env();
        let slot = Slot::take();
        let log_dir = images.log_dir.join(name);
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_dir.display()));
        let sock_dir = std::env::temp_dir().join(format!(
            "kva-vm-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&sock_dir);
        fs::create_dir_all(&sock_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", sock_dir.display()));
        let log_file = |file: &str| {
            File::create(log_dir.join(file))
                .unwrap_or_else(|e| panic!("cannot create {file} in {}: {e}", log_dir.display()))
        };

        let vhost = config.vsock.then(|| {
            let mut cmd = Command::new(&images.vhost_device_vsock);
            cmd.arg("--vm").arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                sock_dir.join("vhost.sock").display(),
                sock_dir.join("vm.vsock").display()
            ));
            cmd.stdin(Stdio::null())
                .stdout(log_file("vhost-device-vsock.log"))
                .stderr(log_file("vhost-device-vsock.log"));
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().expect("start vhost-device-vsock");
            // It creates the vhost-user socket QEMU connects to.
            let deadline = Instant::now() + TIMEOUT;
            while !sock_dir.join("vhost.sock").exists() {
                if let Ok(Some(s)) = child.try_wait() {
                    panic!("vhost-device-vsock exited ({s}): see {}", log_dir.display());
                }
                assert!(
                    Instant::now() < deadline,
                    "vhost-device-vsock made no socket"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            child
        });

        let mut append = format!(
            "console=ttyS0 quiet panic=-1 kva.agent={} kva.late={} kva.late_after={} kva.log={}",
            config.agent,
            if config.late.is_empty() {
                "none"
            } else {
                config.late
            },
            config.late_after_seconds,
            config.log_level
        );
        if !config.agent_config.is_empty() {
            let _ = write!(append, " kva.config={}", config.agent_config);
        }
        if config.tmp_mib > 0 {
            let _ = write!(append, " kva.tmp_mib={}", config.tmp_mib);
        }
        if let Some(blocked) = config.qemu_ga {
            let _ = write!(append, " kva.qga=1 kva.qga_block={blocked}");
        }
        let memory = format!("{}M", config.memory_mib);
        let mut cmd = Command::new(&images.qemu);
        cmd.args(["-accel", accel(), "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-smp", "1", "-m", &memory])
            .args(if config.reboot {
                &[][..]
            } else {
                &["-no-reboot"][..]
            })
            .arg("-kernel")
            .arg(&images.kernel)
            .arg("-initrd")
            .arg(&images.initramfs)
            .args(["-append", &append, "-serial", "stdio"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                sock_dir.join("qmp.sock").display()
            ));
        if config.virtio_serial {
            cmd.args(["-device", "virtio-serial-pci,id=vser0"]);
        }
        if config.virtio_serial && config.port_at_boot {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=kva,path={},server=on,wait=off",
                    sock_dir.join("kva.sock").display()
                ))
                .arg("-device")
                .arg(format!(
                    "virtserialport,bus=vser0.0,chardev=kva,id={PORT_ID},name={PORT_NAME}"
                ));
        }
        if config.virtio_serial && (config.qga_port || config.qemu_ga.is_some()) {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=qga,path={},server=on,wait=off",
                    sock_dir.join("qga.sock").display()
                ))
                .arg("-device")
                .arg(format!(
                    "virtserialport,bus=vser0.0,chardev=qga,id={QGA_PORT_ID},name={QGA_PORT_NAME}"
                ));
        }
        if config.vsock {
            cmd.args([
                "-object",
                &format!("memory-backend-memfd,id=mem0,size={memory},share=on"),
                "-machine",
                "memory-backend=mem0",
            ])
            .arg("-chardev")
            .arg(format!(
                "socket,id=vv,path={}",
                sock_dir.join("vhost.sock").display()
            ))
            .args(["-device", "vhost-user-vsock-pci,chardev=vv"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file("qemu.log"));
        die_with_parent(&mut cmd);
        let mut line = format!("{}", images.qemu.display());
        for a in cmd.get_args() {
            let _ = write!(line, " {}", a.to_string_lossy());
        }
        let _ = fs::write(log_dir.join("qemu-command.txt"), format!("{line}\n"));
        let booted = Instant::now();
        let mut qemu = cmd.spawn().expect("start QEMU");
        let console = Console::start(
            log_dir.join("console.log"),
            qemu.stdout.take().expect("piped"),
        );
        let qmp = Qmp::connect(&sock_dir.join("qmp.sock"), &mut qemu);
        let vm = Self {
            name: name.to_string(),
            log_dir,
            sock_dir,
            qemu,
            vhost,
            console,
            qmp,
            booted,
            _slot: slot,
        };
        vm.log(&format!(
            "booting ({} MiB, -accel {}): {append} (logs in {})",
            config.memory_mib,
            accel(),
            vm.log_dir.display()
        ));
        vm
    }

    /// Hot-plug the agent's port into a guest booted without it
    /// ([`GuestConfig::port_at_boot`] false): QMP `chardev-add` (a unix
    /// socket server at [`Self::serial_socket`]), then `device_add` of a
    /// `virtserialport` on the existing controller's bus.
    pub fn hotplug_port(&self) {
        self.qmp.execute(
            "chardev-add",
            json!({
                "id": "kva",
                "backend": {
                    "type": "socket",
                    "data": {
                        "addr": {
                            "type": "unix",
                            "data": { "path": self.serial_socket().display().to_string() }
                        },
                        "server": true,
                        "wait": false
                    }
                }
            }),
        );
        self.qmp.execute(
            "device_add",
            json!({
                "driver": "virtserialport",
                "bus": "vser0.0",
                "chardev": "kva",
                "id": PORT_ID,
                "name": PORT_NAME
            }),
        );
        self.log("hot-plugged the agent's port: QMP chardev-add + device_add virtserialport");
    }

    /// Run a QMP command; returns its `return` value (panics on `error`).
    pub fn qmp(&self, command: &str, arguments: Value) -> Value {
        self.qmp.execute(command, arguments)
    }

    /// Print a line to the test's output, prefixed with the guest's name and
    /// the seconds since QEMU started.
    pub fn log(&self, what: &str) {
        println!(
            "[{} +{:.1}s] {what}",
            self.name,
            self.booted.elapsed().as_secs_f64()
        );
    }

    /// Seconds since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.booted.elapsed()
    }

    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The host end of the agent's virtio-serial port (QEMU's chardev socket).
    pub fn serial_socket(&self) -> PathBuf {
        self.sock_dir.join("kva.sock")
    }

    /// The client target for the virtio-serial port.
    pub fn serial_target(&self) -> Target {
        Target::Unix(self.serial_socket())
    }

    /// The client target for the agent's vsock port, through vhost-device-vsock.
    pub fn vsock_target(&self) -> Target {
        Target::HybridVsock {
            path: self.sock_dir.join("vm.vsock"),
            port: VSOCK_PORT,
        }
    }

    /// Wait until the guest has opened the agent's port: the QMP event
    /// `VSERPORT_CHANGE` with `open: true` (or `frontend-open` already set
    /// when asked).
    pub fn wait_port_open(&self) {
        self.wait_chardev_open("kva", PORT_ID);
        self.log("the guest opened the agent's virtio-serial port (VSERPORT_CHANGE open=true)");
    }

    /// The host end of qemu-guest-agent's port ([`GuestConfig::qga_port`],
    /// [`GuestConfig::qemu_ga`]).
    pub fn qga_socket(&self) -> PathBuf {
        self.sock_dir.join("qga.sock")
    }

    /// Wait until the guest has opened qemu-guest-agent's port (our QGA
    /// front end or qemu-ga itself), as [`Self::wait_port_open`] does for
    /// the agent's own.
    pub fn wait_qga_port_open(&self) {
        self.wait_chardev_open("qga", QGA_PORT_ID);
        self.log("the guest opened qemu-guest-agent's port (VSERPORT_CHANGE open=true)");
    }

    fn wait_chardev_open(&self, chardev: &str, port_id: &str) {
        let chardevs = self.qmp.execute("query-chardev", json!({}));
        let open_now = chardevs
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["label"] == chardev && c["frontend-open"] == true);
        if !open_now {
            self.qmp
                .wait(&format!("VSERPORT_CHANGE {port_id} open=true"), |st| {
                    st.events
                        .iter()
                        .any(|e| {
                            e["event"] == "VSERPORT_CHANGE"
                                && e["data"]["id"] == port_id
                                && e["data"]["open"] == true
                        })
                        .then_some(())
                });
        }
    }

    /// The agent's CPU time inside the guest over `samples` one-second
    /// intervals, from the next `KVA-CPU` sample after `from`. Returns the
    /// tick counts seen (`samples + 1` of them).
    pub fn cpu_window(&self, from: Mark, samples: usize) -> (Mark, Vec<u64>) {
        let mut at = from;
        let mut ticks = Vec::with_capacity(samples + 1);
        for _ in 0..=samples {
            let (next, t) = self.console.next_cpu_sample(at);
            at = next;
            ticks.push(t);
        }
        (at, ticks)
    }

    /// Assert that the agent used at most `max_ticks` of CPU over a window of
    /// `samples` seconds starting now; `state` says what the host is doing.
    pub fn assert_quiet(&self, state: &str, samples: usize, max_ticks: u64) -> Mark {
        // The window opens once a second passes with no CPU used (at most 10
        // s of waiting): work that was finishing when the state changed
        // (start-up scans, the last answers, their log lines) is not idling,
        // and a spinning agent never settles, so it still fails below.
        let (mut from, mut last) = self.console.next_cpu_sample(self.console.mark());
        for _ in 0..10 {
            let (next, t) = self.console.next_cpu_sample(from);
            from = next;
            if t == last {
                break;
            }
            last = t;
        }
        let (at, ticks) = self.cpu_window(from, samples);
        let ticks = &ticks[..];
        let used = ticks[ticks.len() - 1] - ticks[0];
        self.log(&format!(
            "agent CPU while {state}: {used} ticks in {samples} s (samples {ticks:?}, bound {max_ticks})"
        ));
        assert!(
            used <= max_ticks,
            "the agent used {used} clock ticks of CPU in {samples} s while {state} \
             (bound {max_ticks}; a busy loop burns about 100 a second); samples {ticks:?}"
        );
        at
    }

    /// Wait for QEMU to exit (the guest powered off), within [`TIMEOUT`].
    pub fn wait_qemu_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.qemu.try_wait().expect("wait for QEMU") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU still runs {TIMEOUT:?} later: the guest did not power off"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Client options for the tests: every wait bounded by [`TIMEOUT`].
    pub fn client_options() -> ClientOptions {
        ClientOptions {
            connect_timeout: TIMEOUT,
            call_timeout: TIMEOUT,
            ..ClientOptions::default()
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        if let Some(v) = self.vhost.as_mut() {
            let _ = v.kill();
            let _ = v.wait();
        }
        let _ = fs::remove_dir_all(&self.sock_dir);
        if std::thread::panicking() {
            let mut msg = format!(
                "\n[{}] test failed; guest console log: {}\n[{}] other logs in {}\n[{}] last console lines:\n",
                self.name,
                self.console.path().display(),
                self.name,
                self.log_dir.display(),
                self.name
            );
            for line in self.console.tail(40) {
                let _ = writeln!(msg, "    {line}");
            }
            eprintln!("{msg}");
        }
    }
}

/// The basic checks through a connected client: its `agent_ready` has a
/// boot id, `ping` answers and `get_capabilities` lists both methods.
/// Returns the boot id.
pub async fn check_agent(client: &Client) -> String {
    let ready = client
        .agent_ready()
        .expect("the client received agent_ready");
    assert!(
        !ready.boot_id.trim().is_empty(),
        "agent_ready without a boot_id: {ready:?}"
    );
    let rtt = client.ping().await.expect("ping");
    let caps = client.get_capabilities().await.expect("get_capabilities");
    for method in ["ping", "get_capabilities"] {
        assert!(
            caps.methods.iter().any(|m| m == method),
            "get_capabilities does not list {method}: {:?}",
            caps.methods
        );
    }
    println!(
        "    agent {} (protocol {}), boot_id {}, ping {rtt:?}, {} methods",
        ready.agent_version,
        ready.protocol_version,
        ready.boot_id,
        caps.methods.len()
    );
    ready.boot_id
}

/// A single-threaded tokio runtime for a test's client calls.
///
/// A dropped [`Client`] closes its socket only when its runtime next runs
/// (its tasks are aborted, then dropped by the runtime): to end a host session
/// at a known point, drop the runtime, or use one runtime per session.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_samples_parse() {
        assert_eq!(parse_cpu_sample("KVA-CPU 42"), Some(42));
        assert_eq!(parse_cpu_sample("[  1.0] foo KVA-CPU 7"), Some(7));
        assert_eq!(parse_cpu_sample("KVA-CPU x"), None);
        assert_eq!(parse_cpu_sample("KVA-AGENT-PID 12"), None);
        assert_eq!(parse_cpu_sample("KVA-CPU 42 fds=9 rss_kib=5120"), Some(42));
    }

    #[test]
    fn stats_parse() {
        assert_eq!(
            parse_stat("[ 3.1] KVA-CPU 42 fds=9 rss_kib=5120"),
            Some(AgentStat {
                ticks: 42,
                fds: 9,
                rss_kib: 5120
            })
        );
        assert_eq!(parse_stat("KVA-CPU 42"), None);
    }

    /// A console fed from memory (its log file removed once it is read).
    fn console_of(name: &str, text: &'static str) -> Arc<Console> {
        let log = std::env::temp_dir().join(format!("kva-{}-{name}", std::process::id()));
        let console = Console::start(log.clone(), text.as_bytes());
        while !lock_ignoring_poison(&console.state).closed {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::fs::remove_file(log);
        console
    }

    #[test]
    fn a_port_found_by_the_safety_net_rescan_fails_the_check() {
        let by_event = console_of(
            "console-by-event.log",
            "KVA-INIT agent=virtio-serial late=virtio_console log=debug
kvm-manager-agent: debug: looking for virtio-serial port p again (safety net: nothing changed in /dev)
kvm-manager-agent: debug: looking for virtio-serial port p again (something changed in /dev)
kvm-manager-agent: info: opened virtio-serial port /dev/vport0p1
",
        );
        assert_eq!(by_event.wait_port_found_by_event(1), 4);
        let by_timer = console_of(
            "console-by-timer.log",
            "KVA-INIT agent=virtio-serial late=virtio_console log=debug
kvm-manager-agent: debug: looking for virtio-serial port p again (something changed in /dev)
kvm-manager-agent: debug: looking for virtio-serial port p again (safety net: nothing changed in /dev)
kvm-manager-agent: info: opened virtio-serial port /dev/vport0p1
",
        );
        let failed = std::panic::catch_unwind(|| by_timer.wait_port_found_by_event(1));
        assert!(
            failed.is_err(),
            "found by the safety net, yet the check passed"
        );
    }
}
