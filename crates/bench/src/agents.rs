//! Starting both agents on unix sockets in a temporary folder, and stopping
//! them (a dropped [`Agent`] is killed).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wire::{Kva, Qga};

/// qemu-ga's RPCs that change the guest's state, blocked with `-b` in every
/// run. guest-file-write and guest-exec stay open: the benchmark needs them
/// (files go to the run's own folder; exec runs /bin/true).
pub const QGA_BLOCKED: &str = "guest-set-time,guest-shutdown,guest-fsfreeze-freeze,\
guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,guest-fstrim,guest-suspend-disk,\
guest-suspend-ram,guest-suspend-hybrid,guest-set-vcpus,guest-set-user-password,\
guest-set-memory-blocks,guest-ssh-add-authorized-keys,guest-ssh-remove-authorized-keys";

/// Which agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ours,
    Qga,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ours => "kvm-manager-agent",
            Kind::Qga => "qemu-ga",
        }
    }
}

/// The binaries and the run's folders.
#[derive(Debug)]
pub struct Setup {
    pub ours: PathBuf,
    pub qga: PathBuf,
    /// Sockets, configuration, logs, qemu-ga's state.
    pub work: PathBuf,
    /// Where the agents' files go (tmpfs when there is one).
    pub files: PathBuf,
    /// The host side's local files.
    pub local: PathBuf,
    config: PathBuf,
    qga_config: PathBuf,
}

impl Setup {
    pub fn new(ours: PathBuf, qga: PathBuf) -> io::Result<Self> {
        let tag = format!("kva-bench-{}", std::process::id());
        let work = std::env::temp_dir().join(&tag);
        let shm = Path::new("/dev/shm");
        let files_base = if shm.is_dir() {
            shm.join(&tag)
        } else {
            work.join("files-base")
        };
        let _ = fs::remove_dir_all(&work);
        let _ = fs::remove_dir_all(&files_base);
        fs::create_dir_all(&work)?;
        let files = files_base.join("guest");
        let local = files_base.join("host");
        fs::create_dir_all(&files)?;
        fs::create_dir_all(&local)?;
        for d in [&work, &files_base, &files, &local] {
            set_mode(d, 0o700)?;
        }
        let config = work.join("agent.toml");
        let text = format!(
            "# The benchmark's agent: exec of /bin/true only, files in the run's folder,\n\
             # room for 1,000 connections, power methods off, audit records to stderr.\n\
             [limits]\nmax_connections = 1100\n\n\
             [security]\nenable_exec = true\nallowed_commands = [\"/bin/true\"]\n\
             allowed_file_paths = [{files:?}]\ndisabled_methods = [\"shutdown\", \"reboot\"]\n\n\
             [audit]\ndestination = \"stderr\"\n",
            files = files.display().to_string()
        );
        fs::write(&config, text)?;
        set_mode(&config, 0o644)?;
        let qga_config = work.join("qemu-ga.conf");
        fs::write(&qga_config, "")?;
        Ok(Self {
            ours,
            qga,
            work,
            files,
            local,
            config,
            qga_config,
        })
    }

    /// Start an agent named `name` (its socket is `work/name.sock`) without
    /// waiting for it.
    pub fn spawn(&self, kind: Kind, name: &str) -> io::Result<Agent> {
        let sock = self.work.join(format!("{name}.sock"));
        let _ = fs::remove_file(&sock);
        let log = File::create(self.work.join(format!("{name}.log")))?;
        let mut cmd = match kind {
            Kind::Ours => {
                let mut c = Command::new(&self.ours);
                c.arg("--config")
                    .arg(&self.config)
                    .arg("--transport")
                    .arg(format!("unix:{}", sock.display()));
                c
            }
            Kind::Qga => {
                let state = self.work.join(format!("{name}.state"));
                fs::create_dir_all(&state)?;
                let mut c = Command::new(&self.qga);
                c.arg("-m")
                    .arg("unix-listen")
                    .arg("-p")
                    .arg(&sock)
                    .arg("-c")
                    .arg(&self.qga_config)
                    .arg("-t")
                    .arg(&state)
                    .arg("-f")
                    .arg(state.join("qemu-ga.pid"))
                    .arg("-b")
                    .arg(QGA_BLOCKED);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn()?;
        Ok(Agent {
            kind,
            pid: child.id(),
            child,
            sock,
            started: Instant::now(),
        })
    }

    /// Start an agent and wait until it answers a ping.
    pub fn start(&self, kind: Kind, name: &str) -> io::Result<Agent> {
        let mut agent = self.spawn(kind, name)?;
        agent.first_answer()?;
        Ok(agent)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.work);
        if let Some(base) = self.files.parent() {
            let _ = fs::remove_dir_all(base);
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A running agent; killed when dropped.
#[derive(Debug)]
pub struct Agent {
    pub kind: Kind,
    pub pid: u32,
    pub sock: PathBuf,
    child: Child,
    started: Instant,
}

/// How long an agent may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    /// Connect (retrying while the socket is not there yet) and ping once;
    /// returns the time from spawning the process to that answer.
    pub fn first_answer(&mut self) -> io::Result<Duration> {
        loop {
            let answered = match self.kind {
                Kind::Ours => {
                    Kva::connect(&self.sock).and_then(|mut c| c.call_raw("ping", None).map(|_| ()))
                }
                Kind::Qga => Qga::connect_plain(&self.sock)
                    .and_then(|mut c| c.call_raw("guest-ping", None).map(|_| ())),
            };
            match answered {
                Ok(()) => return Ok(self.started.elapsed()),
                Err(e) => {
                    if let Some(status) = self.child.try_wait()? {
                        return Err(io::Error::other(format!(
                            "{} exited ({status}) before answering: {e}",
                            self.kind.name()
                        )));
                    }
                    if self.started.elapsed() > START_TIMEOUT {
                        return Err(io::Error::other(format!(
                            "{} did not answer within {START_TIMEOUT:?}: {e}",
                            self.kind.name()
                        )));
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.sock);
    }
}
