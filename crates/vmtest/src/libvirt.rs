//! A private libvirtd for the test that drives a guest through libvirt
//! (tests/libvirt_qga.rs): libvirt as a real client of the agent's
//! qemu-guest-agent front end.
//!
//! libvirtd 9.0 wants a `libvirt-qemu` user and writes to /etc/libvirt, /run
//! and /var. Nothing of the machine's is touched: libvirtd and virtlogd run
//! inside `unshare -m --propagation private`, where a private folder's
//! `etc-libvirt`, `run` and `var` and copies of /etc/passwd and /etc/group
//! (with `libvirt-qemu` added) are bind-mounted over the machine's. That
//! folder is under the system temporary folder and removed when the
//! [`Libvirt`] is dropped; `virsh` connects from outside through
//! `qemu:///system?socket=<folder>/run/libvirt/libvirt-sock`.
//!
//! On every exit path of the test (a failed assertion included) the domain
//! is destroyed, QEMU killed by the pid libvirt recorded, and libvirtd's
//! process group (libvirtd, virtlogd) killed. If the test process itself is
//! SIGKILLed, only libvirtd follows it (`PR_SET_PDEATHSIG`): virtlogd and
//! QEMU stay. (Running libvirtd as the first process of its own PID
//! namespace would fix that, but libvirtd 9.0's capability probe of QEMU
//! hangs there: "Failed to terminate process ... Device or resource busy".)
//!
//! qemu.conf runs QEMU as root, with no cgroups, no namespaces and no
//! security driver (there is no init system nor AppArmor to serve them).
//! Logs: `libvirtd.log` (libvirtd's and virtlogd's stderr), `qemu-domain.log`
//! (libvirt's log of the domain's QEMU, copied on drop) and `domain.xml` in
//! the test's log folder.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{die_with_parent, Console, Images, Slot, PORT_NAME, QGA_PORT_NAME, TIMEOUT};

/// Paths of libvirt's programs, from `cargo xtask vm-test` (which installs them).
#[derive(Debug, Clone)]
pub struct Tools {
    pub libvirtd: PathBuf,
    pub virtlogd: PathBuf,
    pub virsh: PathBuf,
}

impl Tools {
    /// Read `KVA_VM_LIBVIRTD`, `KVA_VM_VIRTLOGD` and `KVA_VM_VIRSH`; panics
    /// (fails the test) when one is missing: a missing tool is a failure,
    /// never a skip.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            let path = PathBuf::from(std::env::var_os(name).unwrap_or_else(|| {
                panic!("{name} is not set: run the VM tests with `cargo xtask vm-test`")
            }));
            assert!(
                path.is_file(),
                "{name}={} does not exist (`cargo xtask vm-test` installs libvirt)",
                path.display()
            );
            path
        };
        Self {
            libvirtd: var("KVA_VM_LIBVIRTD"),
            virtlogd: var("KVA_VM_VIRTLOGD"),
            virsh: var("KVA_VM_VIRSH"),
        }
    }
}

/// The script run by `unshare -m --propagation private sh -c SCRIPT sh DIR
/// VIRTLOGD LIBVIRTD`: bind mounts, virtlogd in the background, then
/// libvirtd in the foreground.
const SCRIPT: &str = r#"set -e
d=$1
mount --bind "$d/etc-libvirt" /etc/libvirt
mount --bind "$d/passwd" /etc/passwd
mount --bind "$d/group" /etc/group
mount --bind "$d/run" /run
mount --bind "$d/var" /var
"$2" &
n=0
while [ ! -S /run/libvirt/virtlogd-sock ]; do
    n=$((n + 1))
    if [ "$n" -gt 1200 ]; then echo "virtlogd made no socket" >&2; exit 1; fi
    sleep 0.1
done
exec "$3"
"#;

const QEMU_CONF: &str = r#"# Written by crates/vmtest/src/libvirt.rs for a private libvirtd.
user = "root"
group = "root"
dynamic_ownership = 0
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
remember_owner = 0
"#;

/// A private libvirtd (and virtlogd), killed when dropped with every QEMU it
/// started.
#[derive(Debug)]
pub struct Libvirt {
    tools: Tools,
    dir: PathBuf,
    log_dir: PathBuf,
    daemon: Child,
    started: Instant,
    name: String,
}

impl Libvirt {
    /// Start libvirtd for the test `name` and wait until it answers virsh.
    pub fn start(name: &str) -> Self {
        let tools = Tools::from_env();
        let images = Images::from_env();
        let log_dir = images.log_dir.join(name);
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_dir.display()));
        let tmp = std::env::temp_dir();
        assert!(
            !tmp.starts_with("/run") && !tmp.starts_with("/var"),
            "the temporary folder {} would be hidden by libvirtd's private /run or /var",
            tmp.display()
        );
        let dir = tmp.join(format!("kva-libvirt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in [
            "etc-libvirt",
            "run/libvirt",
            "var/lib/libvirt/qemu",
            "var/cache/libvirt/qemu",
            "var/log/libvirt/qemu",
            "var/run",
            "var/tmp",
            "guest",
        ] {
            fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("cannot create {}/{sub}: {e}", dir.display()));
        }
        let write = |rel: &str, text: &str| {
            fs::write(dir.join(rel), text)
                .unwrap_or_else(|e| panic!("cannot write {}/{rel}: {e}", dir.display()));
        };
        write("etc-libvirt/qemu.conf", QEMU_CONF);
        write(
            "etc-libvirt/libvirtd.conf",
            "# private libvirtd: defaults\n",
        );
        write(
            "etc-libvirt/virtlogd.conf",
            "# private virtlogd: defaults\n",
        );
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        let group = fs::read_to_string("/etc/group").expect("read /etc/group");
        let add = |text: &str, line: &str| {
            let mut t = text.to_string();
            if !t.ends_with('\n') && !t.is_empty() {
                t.push('\n');
            }
            if !t.lines().any(|l| l.starts_with("libvirt-qemu:")) {
                t.push_str(line);
            }
            t
        };
        write(
            "passwd",
            &add(
                &passwd,
                "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n",
            ),
        );
        write("group", &add(&group, "libvirt-qemu:x:64055:\n"));

        let log = File::create(log_dir.join("libvirtd.log")).expect("create libvirtd.log");
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", SCRIPT, "sh"])
            .arg(&dir)
            .arg(&tools.virtlogd)
            .arg(&tools.libvirtd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            // Its own process group (libvirtd and virtlogd in it), killed
            // as a whole on drop.
            .process_group(0);
        die_with_parent(&mut cmd);
        let daemon = cmd.spawn().expect("start unshare (util-linux)");
        let mut lv = Self {
            tools,
            dir,
            log_dir,
            daemon,
            started: Instant::now(),
            name: name.to_string(),
        };
        let sock = lv.dir.join("run/libvirt/libvirt-sock");
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(&sock).is_err() {
            if let Ok(Some(s)) = lv.daemon.try_wait() {
                panic!(
                    "libvirtd exited ({s}) before listening: see {}",
                    lv.log_dir.join("libvirtd.log").display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd made no socket in {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lv.log(&format!(
            "libvirtd listens on {} (private /etc/libvirt, /run, /var under {})",
            sock.display(),
            lv.dir.display()
        ));
        let version = lv.virsh(&["version"]);
        lv.log(&format!("virsh version: {}", version.replace('\n', "; ")));
        lv
    }

    /// The connection URI for virsh.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.join("run/libvirt/libvirt-sock").display()
        )
    }

    /// A folder for the guest's sockets, seen alike by the test and libvirtd.
    pub fn guest_dir(&self) -> PathBuf {
        self.dir.join("guest")
    }

    /// The test's log folder.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Print a line prefixed with the test's name and the seconds since
    /// libvirtd was started.
    pub fn log(&self, what: &str) {
        println!(
            "[{} +{:.1}s] {what}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Run `virsh -c URI ARGS...`: its standard output, or what it said and
    /// how it ended. A hang is killed after [`TIMEOUT`] and reported.
    pub fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.tools.virsh);
        cmd.arg("-c")
            .arg(self.uri())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start virsh");
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(TIMEOUT) {
            Ok(out) => out.expect("wait for virsh"),
            Err(_) => {
                // SAFETY: kill(2) of our own child, by its id.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return Err(format!("virsh {args:?} did not finish in {TIMEOUT:?}"));
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "virsh {args:?} failed ({}): {}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// [`Self::try_virsh`], failing the test on an error.
    pub fn virsh(&self, args: &[&str]) -> String {
        self.try_virsh(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Define and start a TCG domain `name` booting the harness's kernel and
    /// initramfs with `cmdline` (the `kva.*` parameters), with the channels
    /// `org.qemu.guest_agent.0` (libvirt's: libvirt connects to it) and the
    /// agent's own `org.kvmmanager.agent.0` (for the test's native client at
    /// [`Domain::native_socket`]). Started paused, so that the console is
    /// read from the first line, then resumed.
    ///
    /// With `disk_mib`, the domain also has a virtio disk (`vda`) of that
    /// size with an empty ext4 file system, made with `mke2fs` under the
    /// private folder (the guest mounts it with `kva.disk=DIR`).
    pub fn start_domain(&self, name: &str, cmdline: &str, disk_mib: Option<u64>) -> Domain<'_> {
        let images = Images::from_env();
        let slot = Slot::take();
        let g = self.guest_dir();
        let disk = disk_mib.map(|mib| {
            let path = g.join("disk.img");
            File::create(&path)
                .and_then(|f| f.set_len(mib << 20))
                .unwrap_or_else(|e| panic!("cannot make {}: {e}", path.display()));
            let status = Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4", "-L", "kvadata"])
                .arg(&path)
                .status()
                .expect("run mke2fs (e2fsprogs)");
            assert!(status.success(), "mke2fs {}: {status}", path.display());
            path
        });
        let xml = domain_xml(name, &images, cmdline, &g, disk.as_deref());
        let xml_path = self.log_dir.join("domain.xml");
        fs::write(&xml_path, &xml).expect("write domain.xml");
        self.virsh(&["define", &xml_path.display().to_string()]);
        self.virsh(&["start", name, "--paused"]);
        let console_sock = g.join("console.sock");
        let stream = UnixStream::connect(&console_sock)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", console_sock.display()));
        let console = Console::start(self.log_dir.join("console.log"), stream);
        self.virsh(&["resume", name]);
        self.log(&format!(
            "domain {name} started (type qemu, direct kernel boot): {cmdline}"
        ));
        Domain {
            lv: self,
            name: name.to_string(),
            console,
            _slot: slot,
        }
    }

    fn qemu_pids(&self) -> Vec<libc::pid_t> {
        let dir = self.dir.join("run/libvirt/qemu");
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .filter_map(|t| t.trim().parse().ok())
            .collect()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // QEMU runs in its own session: kill it by the pid libvirt recorded.
        for pid in self.qemu_pids() {
            // SAFETY: kill(2) by id of a QEMU this test's libvirtd started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // libvirtd, virtlogd, unshare and sh: the process group we made.
        // SAFETY: killpg(2) of the group whose leader is our own child.
        unsafe { libc::killpg(self.daemon.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.daemon.wait();
        for log in fs::read_dir(self.dir.join("var/log/libvirt/qemu"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = fs::copy(log.path(), self.log_dir.join("qemu-domain.log"));
        }
        let _ = fs::remove_dir_all(&self.dir);
        if std::thread::panicking() {
            eprintln!(
                "\n[{}] test failed; logs in {} (console.log, libvirtd.log, qemu-domain.log)",
                self.name,
                self.log_dir.display()
            );
        }
    }
}

/// A domain of a [`Libvirt`], destroyed (if still running) and undefined
/// when dropped.
#[derive(Debug)]
pub struct Domain<'a> {
    lv: &'a Libvirt,
    name: String,
    console: Arc<Console>,
    _slot: Slot,
}

impl Domain<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The host end of the agent's own port (a QEMU chardev socket).
    pub fn native_socket(&self) -> PathBuf {
        self.lv.guest_dir().join("kva.sock")
    }

    /// `virsh domstate`, trimmed (`running`, `shut off`, ...).
    pub fn state(&self) -> String {
        self.lv.virsh(&["domstate", &self.name]).trim().to_string()
    }

    /// Wait until `virsh domstate` says `want`, within [`TIMEOUT`].
    pub fn wait_state(&self, want: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let state = self.state();
            if state == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "domain {} is still {state:?}, not {want:?}, {TIMEOUT:?} later",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        let _ = self.lv.try_virsh(&["destroy", &self.name]);
        let _ = self.lv.try_virsh(&["undefine", &self.name]);
        if std::thread::panicking() {
            let mut msg = format!("\n[{}] last console lines:\n", self.name);
            for line in self.console.tail(40) {
                let _ = writeln!(msg, "    {line}");
            }
            eprintln!("{msg}");
        }
    }
}

fn domain_xml(name: &str, images: &Images, cmdline: &str, g: &Path, disk: Option<&Path>) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('\'', "&apos;")
    };
    let p = |file: &str| esc(&g.join(file).display().to_string());
    let disk = disk.map_or(String::new(), |d| {
        format!(
            "<disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>",
            esc(&d.display().to_string())
        )
    });
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <!-- Without <acpi/> libvirt 9.0 passes -no-acpi, which QEMU 10 removed. -->
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{qemu}</emulator>
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'/>
    {disk}
    <serial type='unix'>
      <source mode='bind' path='{console}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='{qga}'/>
      <target type='virtio' name='{QGA_PORT_NAME}'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='{kva}'/>
      <target type='virtio' name='{PORT_NAME}'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = esc(&images.kernel.display().to_string()),
        initrd = esc(&images.initramfs.display().to_string()),
        cmdline = esc(cmdline),
        qemu = esc(&images.qemu.display().to_string()),
        console = p("console.sock"),
        qga = p("qga.sock"),
        kva = p("kva.sock"),
    )
}
