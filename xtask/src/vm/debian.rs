//! The Debian guest, and the `debian` step of `cargo xtask test`: the
//! packages under a real systemd.
//!
//! - Root file system: `debootstrap --variant=minbase
//!   --include=systemd-sysv,udev,kmod,iproute2 bookworm` from the mirror of
//!   this machine's own apt sources, plus the kernel's modules (for udev) and
//!   a test-only root shell on ttyS1 (`kva-test-shell.service`: reads one
//!   command per line and runs it; see crates/vmtest/src/debian.rs). Cached
//!   in `<cache>/debian/rootfs-<hash>`, with its ext4 disk image
//!   (`mkfs.ext4 -d`, no loop mounts); the tests boot it with
//!   `snapshot=on` so it stays clean.
//! - Initramfs: busybox, virtio_pci + virtio_blk + ext4, an /init that
//!   mounts /dev/vda and `switch_root`s to systemd.
//! - Payload disk (per run): the .debs under test, as a small ext4 image
//!   the guest mounts read-only.
//!
//! The step also runs the tarball's install.sh in a chroot of a copy of the
//! root file system.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::initramfs::{fnv1a, Cpio};
use super::{cache_dir, kernel, prereqs, target_dir};
use crate::dist::checks::{self, Checks};
use crate::ensure::{self, Need};
use crate::test::{run_cargo_test, Report};
use crate::{cmd, Result};

/// Host tools the Debian guest needs (QEMU comes from [`prereqs`]).
pub const NEEDS: &[Need] = &[
    Need::Apt("debootstrap"),
    Need::Apt("e2fsprogs"),
    Need::Apt("busybox-static"),
    Need::Apt("xz-utils"),
    Need::Apt("dpkg-dev"),
    Need::Apt("rpm"),
    Need::Apt("gzip"),
];

/// Packages added to minbase.
const INCLUDE: &str = "systemd-sysv,udev,kmod,iproute2";
/// Modules the initramfs loads to reach the root file system.
const INITRD_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
/// Module folders copied into the root file system, for udev.
const GUEST_MODULE_DIRS: &[&str] = &[
    "kernel/drivers/virtio",
    "kernel/drivers/char",
    "kernel/drivers/block",
    "kernel/net/vmw_vsock",
    "kernel/fs/ext4",
    "kernel/fs/jbd2",
    "kernel/fs/mbcache.ko",
    "kernel/lib",
    "kernel/crypto",
];

const TEST_SHELL: &str = r#"#!/bin/bash
# Test-only root shell on ttyS1 for the packaging tests of kvm-manager-agent
# (written by `cargo xtask test debian`; never in a package). One command per
# line, run with eval; the host adds its own end marker.
stty -F /dev/ttyS1 raw -echo
exec </dev/ttyS1 >/dev/ttyS1 2>&1
echo "KVA-SHELL-READY"
while IFS= read -r line; do
    eval "$line"
done
"#;

const TEST_SHELL_UNIT: &str = "\
[Unit]
Description=Test-only root shell on ttyS1 (kvm-manager-agent packaging tests)

[Service]
ExecStart=/usr/local/sbin/kva-test-shell
Restart=always

[Install]
WantedBy=multi-user.target
";

const INIT: &str = r#"#!/bin/busybox sh
# /init of the Debian guest's initramfs: reach the root disk, switch to systemd.
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/kva-modules); do
    insmod "/lib/modules/$m.ko" || echo "KVA-INITRD insmod $m failed"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    if [ $i -gt 1000 ]; then echo "KVA-INITRD no /dev/vda"; poweroff -f; fi
    sleep 0.01
done
mount -t ext4 -o rw /dev/vda /newroot || { echo "KVA-INITRD cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys /dev
echo "KVA-INITRD switching to systemd"
exec switch_root /newroot /sbin/init
"#;

/// The Debian guest's images.
#[derive(Debug)]
pub struct Guest {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub disk: PathBuf,
    pub initramfs: PathBuf,
}

/// The `debian` step.
pub fn step(report: &mut Report) -> Result {
    let dist = crate::dist::build()?;
    let guest = prepare()?;
    let accel = super::accel::choose(&guest.qemu, &guest.kernel, &cache_dir()?)?;
    let next_dir = checks::scratch("deb-next")?;
    let next = dist.agent_deb_next(
        "test1",
        "# The default configuration of the test1 upgrade.\n",
        &next_dir,
    )?;
    let next_version = format!("{}+test1-1", dist.version);

    let mut c = Checks::new("debian chroot");
    c.check("tarball: install.sh and uninstall.sh in a chroot", || {
        tarball_in_chroot(&dist, &guest)
    });
    let chroot_result = c.finish(report);

    let payload_dir = checks::scratch("payload")?;
    for (src, name) in [
        (&dist.agent_deb, "agent-old.deb"),
        (&next, "agent-new.deb"),
        (&dist.ctl_deb, "ctl.deb"),
    ] {
        fs::copy(src, payload_dir.join(name))
            .map_err(|e| format!("cannot copy {}: {e}", src.display()))?;
    }
    let payload = target_dir().join("dist-test").join("payload.img");
    let _ = fs::remove_file(&payload);
    cmd::run(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", "kva-payload", "-d"])
            .arg(&payload_dir)
            .arg(&payload)
            .arg("64M"),
    )?;

    let mut test = cmd::cargo();
    test.args([
        "test",
        "-p",
        super::HARNESS,
        "--features",
        "debian",
        "--test",
        "debian_package",
        "--test",
        "debian_guest",
        "--",
        "--nocapture",
    ]);
    for (k, v) in [
        ("KVA_VM_QEMU", guest.qemu.as_os_str()),
        ("KVA_VM_KERNEL", guest.kernel.as_os_str()),
        ("KVA_DEBIAN_DISK", guest.disk.as_os_str()),
        ("KVA_DEBIAN_INITRAMFS", guest.initramfs.as_os_str()),
        ("KVA_DEBIAN_PAYLOAD", payload.as_os_str()),
    ] {
        test.env(k, v);
    }
    test.env("KVA_VM_LOG_DIR", target_dir().join("vmtest"))
        .env("KVA_VM_ACCEL", accel)
        .env("KVA_DEBIAN_VERSION_OLD", dist.deb_version())
        .env("KVA_DEBIAN_VERSION_NEW", &next_version);
    let vm_result = run_cargo_test(&mut test, report);
    chroot_result.and(vm_result)
}

/// Install, build and cache the Debian guest.
pub fn prepare() -> Result<Guest> {
    let tools = prereqs::ensure_all()?;
    ensure::all(NEEDS)?;
    let cache = cache_dir()?;
    let kernel = kernel::prepare(&cache)?;
    let kroot = cache.join("kernel").join(&kernel.package).join("root");
    let moddir = kernel::find_one(&kroot.join("lib/modules"), "")?;
    let kver = moddir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or("no kernel version folder")?;

    let key = fnv1a(
        format!("{INCLUDE}|{kver}|{TEST_SHELL}|{TEST_SHELL_UNIT}|{GUEST_MODULE_DIRS:?}|v1")
            .as_bytes(),
    );
    let dir = cache.join("debian").join(format!("bookworm-{key:016x}"));
    let rootfs = dir.join("rootfs");
    let disk = dir.join("disk.img");
    if !dir.join("ready").exists() {
        // Only the newest guest is useful.
        let _ = fs::remove_dir_all(cache.join("debian"));
        crate::dist::mkdir(&dir)?;
        build_rootfs(&rootfs, &moddir, &kver)?;
        let part = dir.join("disk.img.part");
        cmd::run(
            Command::new("mkfs.ext4")
                .args(["-F", "-q", "-L", "kva-root", "-d"])
                .arg(&rootfs)
                .arg(&part)
                .arg("2G"),
        )?;
        fs::rename(&part, &disk).map_err(|e| format!("cannot rename {}: {e}", part.display()))?;
        fs::write(dir.join("ready"), "").map_err(|e| format!("cannot write the stamp: {e}"))?;
    }
    println!("xtask: Debian guest {} (kernel {kver})", disk.display());

    let available = kernel::index_modules(&moddir)?;
    let order = kernel::load_order(INITRD_MODULES, &available, &|path| {
        let bytes = kernel::read_module(path)?;
        Ok(super::elf::depends(&super::elf::modinfo(
            &bytes,
            &path.display().to_string(),
        )?))
    })?;
    let mut archive = Cpio::default();
    for d in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "sbin",
        "proc",
        "sys",
        "newroot",
    ] {
        archive.dir(d);
    }
    archive.char_device("dev/console", 5, 1);
    archive.file("init", 0o755, INIT.as_bytes());
    archive.file("bin/busybox", 0o755, &checks_read(&tools.busybox)?);
    let list: String = order.iter().map(|m| format!("{m}\n")).collect();
    archive.file("etc/kva-modules", 0o644, list.as_bytes());
    for m in &order {
        archive.file(
            &format!("lib/modules/{m}.ko"),
            0o644,
            &kernel::read_module(&available[m])?,
        );
    }
    let bytes = archive.finish();
    let initramfs = dir.join(format!("initramfs-{:016x}.cpio", fnv1a(&bytes)));
    if !initramfs.exists() {
        fs::write(&initramfs, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", initramfs.display()))?;
    }
    Ok(Guest {
        qemu: tools.qemu,
        kernel: kernel.vmlinux,
        rootfs,
        disk,
        initramfs,
    })
}

fn checks_read(p: &Path) -> Result<Vec<u8>> {
    crate::dist::read(p)
}

/// The bookworm mirror of this machine's apt sources.
fn mirror() -> Result<String> {
    let mut entries: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map_err(|e| format!("cannot list /etc/apt/sources.list.d: {e}"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sources"))
        .collect();
    entries.sort();
    for path in entries {
        let text = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Some((uri, _)) = prereqs::bookworm_entry(&text) {
            return Ok(uri);
        }
    }
    Err(
        "no apt sources entry with the `bookworm` suite in /etc/apt/sources.list.d/*.sources: \
         cannot derive a mirror for debootstrap"
            .into(),
    )
}

fn build_rootfs(rootfs: &Path, moddir: &Path, kver: &str) -> Result {
    let _ = fs::remove_dir_all(rootfs);
    let mirror = mirror()?;
    cmd::run(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={INCLUDE}"),
                "bookworm",
            ])
            .arg(rootfs)
            .arg(&mirror),
    )?;
    // The kernel's modules that udev loads (virtio_console, vsock, ...).
    let dest = rootfs.join("lib/modules").join(kver);
    crate::dist::mkdir(&dest)?;
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if moddir.join(f).exists() {
            fs::copy(moddir.join(f), dest.join(f)).map_err(|e| format!("cannot copy {f}: {e}"))?;
        }
    }
    for sub in GUEST_MODULE_DIRS {
        let to = dest.join(sub);
        crate::dist::mkdir(to.parent().expect("has a parent"))?;
        cmd::run(Command::new("cp").arg("-a").arg(moddir.join(sub)).arg(&to))?;
    }
    cmd::run(
        Command::new("chroot")
            .arg(rootfs)
            .args(["depmod", "-a", kver]),
    )?;

    let w = |path: &str, data: &str, mode: u32| {
        crate::dist::write(&rootfs.join(path), data.as_bytes(), mode)
    };
    w("etc/hostname", "kva-debian\n", 0o644)?;
    w(
        "etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 kva-debian\n",
        0o644,
    )?;
    w(
        "etc/fstab",
        "/dev/vda / ext4 rw,errors=remount-ro 0 0\n",
        0o644,
    )?;
    w("usr/local/sbin/kva-test-shell", TEST_SHELL, 0o755)?;
    w(
        "etc/systemd/system/kva-test-shell.service",
        TEST_SHELL_UNIT,
        0o644,
    )?;
    let wants = rootfs.join("etc/systemd/system/multi-user.target.wants");
    crate::dist::mkdir(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/kva-test-shell.service",
        wants.join("kva-test-shell.service"),
    )
    .map_err(|e| format!("cannot enable kva-test-shell.service: {e}"))?;
    // Keep the image small: no package lists or downloaded .debs.
    let _ = fs::remove_dir_all(rootfs.join("var/cache/apt/archives"));
    let _ = fs::remove_dir_all(rootfs.join("var/lib/apt/lists"));
    crate::dist::mkdir(&rootfs.join("var/cache/apt/archives/partial"))?;
    crate::dist::mkdir(&rootfs.join("var/lib/apt/lists/partial"))?;
    Ok(())
}

/// install.sh, again, uninstall.sh in a chroot of a copy of the root file
/// system (no systemd running there: the unit is enabled, not started), with
/// the installed agent validating its configuration inside the chroot.
fn tarball_in_chroot(dist: &crate::dist::Dist, guest: &Guest) -> Result {
    let work = checks::scratch("chroot")?;
    let root = work.join("root");
    cmd::run(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&guest.rootfs)
            .arg(&root),
    )?;
    let src = checks::extract_tarball(dist, &root.join("tmp"))?;
    let inside = Path::new("/tmp").join(src.file_name().ok_or("tarball folder")?);
    let chroot = |args: &[&str]| -> Result<String> {
        let mut c = Command::new("chroot");
        c.arg(&root).args(args);
        cmd::announce(&c);
        let out = c.output().map_err(|e| format!("cannot run chroot: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{text}");
        cmd::check(&c, out.status)?;
        Ok(text)
    };
    let install = inside.join("install.sh").display().to_string();
    let uninstall = inside.join("uninstall.sh").display().to_string();
    let before = checks::snapshot(&root.join("etc"))?;

    chroot(&[&install])?;
    let conf = root.join("etc/kvm-manager-agent/config.toml");
    let wants = root.join("etc/systemd/system/multi-user.target.wants/kvm-manager-agent.service");
    if !root.join("usr/local/bin/kvm-manager-agent").exists() || !conf.exists() {
        return Err("install.sh did not install the binary and config".into());
    }
    if fs::symlink_metadata(&wants).is_err() {
        return Err("install.sh did not enable the unit (no multi-user.target.wants link)".into());
    }
    let checked = chroot(&["/usr/local/bin/kvm-manager-agent", "--check-config"])?;
    println!("(--check-config in the chroot said: {})", checked.trim());
    let once = checks::snapshot(&root.join("etc"))?;
    chroot(&[&install])?;
    if checks::snapshot(&root.join("etc"))? != once {
        return Err("a second install.sh changed /etc".into());
    }
    let mut changed = fs::read(&conf).map_err(|e| e.to_string())?;
    changed.extend_from_slice(b"# changed in the chroot\n");
    fs::write(&conf, &changed).map_err(|e| e.to_string())?;
    let said = chroot(&[&install])?;
    if fs::read(&conf).map_err(|e| e.to_string())? != changed
        || !root.join("etc/kvm-manager-agent/config.toml.new").exists()
        || !said.contains("config.toml.new")
    {
        return Err("reinstall over a changed config: not kept, or no config.toml.new".into());
    }
    chroot(&[&uninstall])?;
    if root.join("usr/local/bin/kvm-manager-agent").exists()
        || fs::symlink_metadata(&wants).is_ok()
        || root
            .join("etc/systemd/system/kvm-manager-agent.service")
            .exists()
    {
        return Err("uninstall.sh left the binary, the unit or its link".into());
    }
    if fs::read(&conf).map_err(|e| e.to_string())? != changed {
        return Err("uninstall.sh did not keep the changed config".into());
    }
    chroot(&[&uninstall, "--purge"])?;
    if root.join("etc/kvm-manager-agent").exists()
        || root.join("var/lib/kvm-manager-agent").exists()
    {
        return Err("uninstall.sh --purge left /etc or /var/lib/kvm-manager-agent".into());
    }
    if checks::snapshot(&root.join("etc"))? != before {
        return Err("after install and purge, /etc differs from before".into());
    }
    Ok(())
}
