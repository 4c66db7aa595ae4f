//! The hostile-path table and the upload machinery, against a scratch tree.
//!
//! Every case runs twice: with openat2 (the kernel's `RESOLVE_BENEATH`) and
//! with the `O_NOFOLLOW` walk used where openat2 is missing or filtered.

use std::ffi::CString;
use std::os::unix::fs::{symlink, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::path;
use super::resolve::{ResolveError, Resolver, Strategy};
use super::test_tree::{entries, Op, Outcome, Tree, W, WO, WP};
use super::upload::{self, Temp};
use super::Reason;

/// The whole path pipeline: lexical rules, then the resolver; for reads the
/// content read must come from inside the root.
fn attempt(roots: &[PathBuf], p: &str, op: Op, strategy: Strategy) -> Outcome {
    let lex = match path::check(p, roots) {
        Ok(l) => l,
        Err(r) => return Outcome::Refused(r),
    };
    let resolver = Resolver::new(strategy);
    let r = match op {
        Op::Read => resolver.open_read(&lex).map(|o| {
            let mut buf = vec![0u8; 64];
            let n = o.file.read_at(&mut buf, 0).unwrap();
            assert_ne!(
                &buf[..n],
                b"outside secret",
                "{p}: read a file outside the root"
            );
        }),
        Op::Write { overwrite, parents } => resolver.open_write(&lex, parents, overwrite).map(drop),
    };
    match r {
        Ok(()) => Outcome::Ok,
        Err(ResolveError::Refused(r)) => Outcome::Refused(r),
        Err(ResolveError::NotFound) => Outcome::NotFound,
        Err(ResolveError::Exists) => Outcome::Exists,
        Err(ResolveError::Io(e)) => panic!("{p}: unexpected I/O error {e}"),
    }
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

fn mknod_zero(p: &Path) -> bool {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated path; makedev(1, 5) is /dev/zero.
    unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) == 0 }
}

/// Mount a small tmpfs at `p` (we run as root in CI); false where that is
/// not permitted.
fn mount_tmpfs(p: &Path, size: &str) -> bool {
    std::fs::create_dir_all(p).unwrap();
    std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(p)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn hostile_paths_are_refused_with_their_reason() {
    let t = Tree::new("hostile");
    let root = t.root.clone();
    let roots = vec![root.clone()];
    let rs = root.display().to_string();
    let out = t.outside.display().to_string();

    // Set-ups.
    symlink("/etc", root.join("etc_link")).unwrap();
    symlink("/etc/passwd", root.join("passwd_link")).unwrap();
    symlink(root.join("file"), root.join("in_link")).unwrap();
    symlink("file", root.join("rel_in_link")).unwrap();
    symlink(root.join("c2"), root.join("c1")).unwrap();
    symlink("/etc", root.join("c2")).unwrap();
    symlink("/nonexistent/x", root.join("dangling")).unwrap();
    symlink("../outside", root.join("rel_out")).unwrap();
    symlink("/proc/self/root", root.join("proc_link")).unwrap();
    symlink("/dev/zero", root.join("zero_link")).unwrap();
    std::fs::hard_link(t.outside.join("secret"), root.join("hard")).unwrap();
    mkfifo(&root.join("fifo"));
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    let have_dev = mknod_zero(&root.join("zero"));
    let have_mount = mount_tmpfs(&root.join("mnt"), "1m");
    if have_mount {
        std::fs::write(root.join("mnt/x"), "on another fs").unwrap();
    }
    let root_link = t.base.join("root_link");
    symlink(&root, &root_link).unwrap();
    let file_root = t.base.join("file_root");
    std::fs::write(&file_root, "").unwrap();
    std::fs::write(root.join("exists"), "old").unwrap();

    use Outcome::{Exists, NotFound, Refused};
    use Reason::*;
    let long_name = format!("{rs}/{}", "n".repeat(path::NAME_MAX + 1));
    let long_path = format!("{rs}{}", "/d".repeat(path::PATH_MAX / 2 + 1));
    let mut cases: Vec<(String, Op, Outcome, Vec<PathBuf>)> = vec![
        // Traversal, in every spelling.
        (
            format!("{rs}/../outside/secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        (
            format!("{rs}/./../outside/secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        (
            format!("/{rs}/../outside/secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        (
            format!("{rs}/sub/../../outside/secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        (format!("{rs}/.."), Op::Read, Refused(DotDot), roots.clone()),
        (
            format!("{rs}//sub/..//..//outside"),
            WO,
            Refused(DotDot),
            roots.clone(),
        ),
        (
            "/tmp/../etc/passwd".into(),
            Op::Read,
            Refused(DotDot),
            vec!["/tmp".into()],
        ),
        (
            "/tmp/./../etc".into(),
            Op::Read,
            Refused(DotDot),
            vec!["/tmp".into()],
        ),
        (
            "//tmp/../etc".into(),
            Op::Read,
            Refused(DotDot),
            vec!["/tmp".into()],
        ),
        // Not absolute, empty, NUL.
        ("tmp/x".into(), Op::Read, Refused(Relative), roots.clone()),
        ("./x".into(), W, Refused(Relative), roots.clone()),
        ("".into(), Op::Read, Refused(Empty), roots.clone()),
        (
            format!("{rs}/file\0/etc/passwd"),
            Op::Read,
            Refused(Nul),
            roots.clone(),
        ),
        // Outside the allowed directories.
        (
            "/etc/passwd".into(),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            "/etc/shadow".into(),
            WO,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            format!("{out}/secret"),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            format!("{rs}x/file"),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            "/proc/self/root/etc/passwd".into(),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            "/proc/self/fd/0".into(),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            "/dev/zero".into(),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        // Directories where a file is expected.
        (rs.clone(), Op::Read, Refused(Directory), roots.clone()),
        (format!("{rs}/"), WO, Refused(Directory), roots.clone()),
        (
            format!("{rs}/sub/"),
            Op::Read,
            Refused(Directory),
            roots.clone(),
        ),
        (
            format!("{rs}/sub"),
            Op::Read,
            Refused(Directory),
            roots.clone(),
        ),
        (format!("{rs}/sub"), WO, Refused(Directory), roots.clone()),
        // Over-long names.
        (long_name.clone(), W, Refused(TooLong), roots.clone()),
        (long_path.clone(), Op::Read, Refused(TooLong), roots.clone()),
        // Symbolic links, anywhere.
        (
            format!("{rs}/etc_link/passwd"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/etc_link/shadow"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/passwd_link"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/in_link"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/rel_in_link"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/c1/passwd"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/rel_out/secret"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/proc_link/etc/passwd"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/zero_link"),
            Op::Read,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/etc_link/new"),
            WO,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/etc_link/sub/new"),
            WP,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/passwd_link"),
            WO,
            Refused(Symlink),
            roots.clone(),
        ),
        (
            format!("{rs}/dangling"),
            WO,
            Refused(Symlink),
            roots.clone(),
        ),
        // Hard links, FIFOs, sockets.
        (
            format!("{rs}/hard"),
            Op::Read,
            Refused(HardLink),
            roots.clone(),
        ),
        (format!("{rs}/hard"), WO, Refused(HardLink), roots.clone()),
        (format!("{rs}/fifo"), Op::Read, Refused(Fifo), roots.clone()),
        (format!("{rs}/fifo"), WO, Refused(Fifo), roots.clone()),
        (
            format!("{rs}/sock"),
            Op::Read,
            Refused(Socket),
            roots.clone(),
        ),
        // A path through a file.
        (
            format!("{rs}/file/x"),
            Op::Read,
            Refused(NotADirectory),
            roots.clone(),
        ),
        (
            format!("{rs}/file/x"),
            WP,
            Refused(NotADirectory),
            roots.clone(),
        ),
        // The allowed directory itself a link, or a file.
        (
            format!("{}/file", root_link.display()),
            Op::Read,
            Refused(RootNotDirectory),
            vec![root_link.clone()],
        ),
        (
            format!("{}/x", file_root.display()),
            W,
            Refused(RootNotDirectory),
            vec![file_root.clone()],
        ),
        // The agent's own temporary names.
        (
            format!("{rs}/.kva-upload.0123456789abcdef.tmp"),
            WO,
            Refused(ReservedName),
            roots.clone(),
        ),
        // Existing and missing files.
        (format!("{rs}/exists"), W, Exists, roots.clone()),
        (format!("{rs}/missing"), Op::Read, NotFound, roots.clone()),
        (format!("{rs}/nodir/x"), W, NotFound, roots.clone()),
        // Encoded-looking names are just names.
        (
            format!("{rs}/..%2f..%2fetc%2fpasswd"),
            Op::Read,
            NotFound,
            roots.clone(),
        ),
        (
            format!("{rs}/%2e%2e/etc/passwd"),
            Op::Read,
            NotFound,
            roots.clone(),
        ),
        (
            format!("{rs}/..\\..\\etc\\passwd"),
            Op::Read,
            NotFound,
            roots.clone(),
        ),
    ];
    if have_dev {
        cases.push((
            format!("{rs}/zero"),
            Op::Read,
            Refused(Device),
            roots.clone(),
        ));
        cases.push((format!("{rs}/zero"), WO, Refused(Device), roots.clone()));
    } else {
        println!("note: mknod not permitted here: the device-node cases did not run");
    }
    if have_mount {
        cases.push((
            format!("{rs}/mnt/x"),
            Op::Read,
            Refused(MountCrossing),
            roots.clone(),
        ));
        cases.push((
            format!("{rs}/mnt/y"),
            WO,
            Refused(MountCrossing),
            roots.clone(),
        ));
    } else {
        println!("note: mount not permitted here: the mount-crossing cases did not run");
    }
    assert!(cases.len() >= 50, "{} cases", cases.len());

    for strategy in [Strategy::Auto, Strategy::Walk] {
        for (p, op, want, roots) in &cases {
            let got = attempt(roots, p, *op, strategy);
            assert_eq!(&got, want, "{strategy:?} {op:?} {p:?}");
        }
    }
    // Nothing outside was touched, and no FIFO reader blocked (the test
    // would hang).
    assert_eq!(
        std::fs::read_to_string(t.outside.join("secret")).unwrap(),
        "outside secret"
    );
    println!(
        "{} hostile paths refused as documented, with openat2 and with the walk",
        cases.len()
    );
}

#[test]
fn odd_but_valid_names_work() {
    let t = Tree::new("names");
    let roots = vec![t.root.clone()];
    for name in [
        "ünïcødé 名前 🙂",
        "line\nbreak",
        "back\\slash",
        " leading space",
        "-dash",
        "...",
        "%2e%2e",
        "\u{202e}rtl",
    ] {
        for strategy in [Strategy::Auto, Strategy::Walk] {
            let p = t.r(name);
            let lex = path::check(&p, &roots).unwrap();
            let target = Resolver::new(strategy)
                .open_write(&lex, false, true)
                .unwrap();
            let temp = Temp::create(Arc::new(target.dir)).unwrap();
            temp.file.write_all_at(b"x", 0).unwrap();
            temp.commit(&target.name, 0o600, (None, None), true)
                .unwrap();
            assert_eq!(
                attempt(&roots, &p, Op::Read, strategy),
                Outcome::Ok,
                "{name:?}"
            );
        }
    }
}

#[test]
fn create_parents_stays_inside_the_root() {
    let t = Tree::new("parents");
    let roots = vec![t.root.clone()];
    for strategy in [Strategy::Auto, Strategy::Walk] {
        let p = t.r(&format!("a-{strategy:?}/b/c/file"));
        assert_eq!(attempt(&roots, &p, W, strategy), Outcome::NotFound);
        assert_eq!(attempt(&roots, &p, WP, strategy), Outcome::Ok);
        assert!(t.root.join(format!("a-{strategy:?}/b/c")).is_dir());
    }
}

/// A racing thread swaps a directory for a symlink to the outside while the
/// resolver opens a path through it: the outside file is never opened
/// (`attempt` asserts on the content), whatever the interleaving.
#[test]
fn a_symlink_swapped_in_mid_resolution_never_escapes() {
    let t = Tree::new("race");
    let roots = vec![t.root.clone()];
    let dir = t.root.join("swap");
    let link = t.root.join("swap-link");
    let real = t.root.join("swap-real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("secret"), "inside copy").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let racer = {
        let (dir, link, real, outside, stop) = (
            dir.clone(),
            link.clone(),
            real.clone(),
            t.outside.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let _ = symlink(&outside, &link);
            while !stop.load(Ordering::Relaxed) {
                // dir: a real directory, then a link to the outside.
                let _ = std::fs::rename(&real, &dir);
                std::thread::yield_now();
                let _ = std::fs::rename(&dir, &real);
                let _ = std::fs::rename(&link, &dir);
                std::thread::yield_now();
                let _ = std::fs::rename(&dir, &link);
            }
        })
    };
    let p = t.r("swap/secret");
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..4000 {
        let strategy = if i % 2 == 0 {
            Strategy::Auto
        } else {
            Strategy::Walk
        };
        let o = attempt(&roots, &p, Op::Read, strategy);
        assert!(
            // (A component swapped between the open and the look at what
            // refused it may also be reported as not a directory.)
            matches!(
                o,
                Outcome::Ok
                    | Outcome::NotFound
                    | Outcome::Refused(Reason::Symlink | Reason::NotADirectory)
            ),
            "{o:?}"
        );
        *seen.entry(format!("{o:?}")).or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    println!("racing swaps: {seen:?}");
}

#[test]
fn a_fifo_swapped_in_for_the_file_does_not_block() {
    // The type check before opening is bypassed by making the FIFO appear
    // after it: opening goes through O_NONBLOCK and fstat refuses it.
    let t = Tree::new("fifo");
    let fifo = t.root.join("f");
    mkfifo(&fifo);
    let dir = super::resolve::open_root(&t.root).unwrap();
    let name = CString::new("f").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let fd = super::resolve::openat(
            dir.as_raw_fd(),
            &name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
            0,
        )
        .unwrap();
        let st = super::resolve::fstat(fd.as_raw_fd()).unwrap();
        let _ = tx.send(super::resolve::check_regular(&st).is_err());
    });
    assert!(rx
        .recv_timeout(Duration::from_secs(10))
        .expect("open blocked"));
}

#[test]
fn temporaries_are_removed_on_drop_and_commit_sets_the_mode() {
    use std::os::unix::fs::PermissionsExt;
    let t = Tree::new("temp");
    let roots = vec![t.root.clone()];
    let p = t.r("m");
    let lex = path::check(&p, &roots).unwrap();
    let target = Resolver::default().open_write(&lex, false, false).unwrap();
    let dir = Arc::new(target.dir);
    drop(Temp::create(dir.clone()).unwrap());
    assert_eq!(entries(&t.root), ["file", "sub"]);
    let temp = Temp::create(dir).unwrap();
    assert_eq!(entries(&t.root).len(), 3);
    temp.file.write_all_at(b"mode", 0).unwrap();
    temp.commit(&target.name, 0o640, (None, None), false)
        .unwrap();
    assert_eq!(entries(&t.root), ["file", "m", "sub"]);
    let meta = std::fs::metadata(t.root.join("m")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
}

#[test]
fn stale_temporaries_are_removed_but_live_ones_kept() {
    let t = Tree::new("stale");
    std::fs::create_dir_all(t.root.join("a/b")).unwrap();
    let stale = [
        t.root.join(".kva-upload.00000000000000aa.tmp"),
        t.root.join("a/b/.kva-upload.00000000000000bb.tmp"),
    ];
    for s in &stale {
        std::fs::write(s, "partial").unwrap();
    }
    // Not ours by pattern: kept.
    std::fs::write(t.root.join(".kva-upload.notours.tmp"), "").unwrap();
    std::fs::write(t.root.join(".kva-upload.00000000000000cc.tmp.bak"), "").unwrap();
    // A live upload: locked, kept.
    let dir = Arc::new(super::resolve::open_root(&t.root).unwrap());
    let live = Temp::create(dir).unwrap();
    assert_eq!(upload::remove_stale(&[&t.root]), 2);
    assert!(stale.iter().all(|s| !s.exists()));
    let left = entries(&t.root);
    assert!(
        left.contains(&live.name().to_string_lossy().into_owned()),
        "{left:?}"
    );
    assert!(left.contains(&".kva-upload.notours.tmp".to_owned()));
    assert!(upload::is_temp_name(live.name().to_bytes()));
    drop(live);
    assert_eq!(upload::remove_stale(&[&t.root]), 0);
}
