//! The guest kernel: Debian's `linux-image-6.1.*-amd64`, unpacked into the
//! cache. We keep the uncompressed `vmlinux` (QEMU boots it through its PVH
//! entry, about twice as fast as the bzImage under TCG) and the modules the
//! tests need, decompressed, in load order.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::elf;
use crate::{cmd, Result};

/// The modules the guest needs; their dependencies are added from `.modinfo`.
pub const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport",
    // A virtio disk with a file system, for the libvirt test's domfsinfo.
    // (ext4 asks the crypto API for crc32c at mount time: not a modinfo
    // dependency, so named here.)
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];

/// An unpacked kernel.
#[derive(Debug)]
pub struct Kernel {
    /// The package it came from, e.g. `linux-image-6.1.0-35-amd64`.
    pub package: String,
    pub vmlinux: PathBuf,
    /// (module name, decompressed `.ko` path), dependencies first.
    pub modules: Vec<(String, PathBuf)>,
}

/// Download and unpack the kernel package (once per package version).
pub fn prepare(cache: &Path) -> Result<Kernel> {
    let package = kernel_package()?;
    let dir = cache.join("kernel").join(&package);
    let root = dir.join("root");
    let stamp = dir.join("unpacked");
    if !stamp.exists() {
        // A new kernel package replaces the ones unpacked before.
        for old in fs::read_dir(cache.join("kernel"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = fs::remove_dir_all(old.path());
        }
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        cmd::run(
            Command::new("apt-get")
                // Root downloads into root's cache: no need for the _apt sandbox.
                .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
                .current_dir(&dir),
        )?;
        let deb = fs::read_dir(&dir)
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| format!("apt-get download left no .deb in {}", dir.display()))?;
        cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        let _ = fs::remove_file(&deb);
        fs::write(&stamp, "").map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    }

    let vmlinuz = find_one(&root.join("boot"), "vmlinuz-")?;
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.exists() {
        extract_vmlinux(&vmlinuz, &vmlinux)?;
    }

    let lib = find_one(&root.join("lib/modules"), "")?;
    let available = index_modules(&lib)?;
    let order = load_order(WANTED_MODULES, &available, &|path| {
        let bytes = read_module(path)?;
        Ok(elf::depends(&elf::modinfo(
            &bytes,
            &path.display().to_string(),
        )?))
    })?;
    let ko_dir = dir.join("modules");
    fs::create_dir_all(&ko_dir).map_err(|e| format!("cannot create {}: {e}", ko_dir.display()))?;
    let mut modules = Vec::new();
    for name in order {
        let out = ko_dir.join(format!("{name}.ko"));
        if !out.exists() {
            let bytes = read_module(&available[&name])?;
            fs::write(&out, bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        }
        modules.push((name, out));
    }
    Ok(Kernel {
        package,
        vmlinux,
        modules,
    })
}

/// The versioned image package that `linux-image-amd64` depends on.
fn kernel_package() -> Result<String> {
    let query = || cmd::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]));
    let parse = |out: &str| {
        out.lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends:")?.trim();
            (dep.starts_with("linux-image-6.1") && dep.ends_with("-amd64")).then(|| dep.to_string())
        })
    };
    if let Ok((status, out)) = query() {
        if status.success() {
            if let Some(p) = parse(&out) {
                return Ok(p);
            }
        }
    }
    // No package lists yet (a fresh machine): fetch them once and ask again.
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    let (_, out) = query()?;
    parse(&out).ok_or_else(|| {
        "`apt-cache depends linux-image-amd64` names no linux-image-6.1.*-amd64 package".into()
    })
}

/// The single entry of `dir` whose name starts with `prefix`.
pub(super) fn find_one(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(format!(
            "expected one entry `{prefix}*` in {}, found {n}",
            dir.display()
        )),
    }
}

/// Unpack the xz payload of a bzImage: the result is the ELF `vmlinux`.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result {
    let image = fs::read(vmlinuz).map_err(|e| format!("cannot read {}: {e}", vmlinuz.display()))?;
    let magic = b"\xfd7zXZ\0";
    let start = image
        .windows(magic.len())
        .position(|w| w == magic)
        .ok_or_else(|| format!("{} holds no xz stream", vmlinuz.display()))?;
    let elf = xz_decompress(&image[start..], "--single-stream")?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(format!(
            "the xz payload of {} is not an ELF vmlinux",
            vmlinuz.display()
        ));
    }
    let tmp = out.with_extension("part");
    fs::write(&tmp, elf).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, out).map_err(|e| format!("cannot rename to {}: {e}", out.display()))
}

/// `xz -dc` over `input` (run in a thread-fed pipe), returning its output.
fn xz_decompress(input: &[u8], extra: &str) -> Result<Vec<u8>> {
    let mut child = Command::new("xz")
        .args(["-dc", "-q", extra])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run xz: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        // xz may stop reading after the first stream: a broken pipe is fine.
        let _ = stdin.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot wait for xz: {e}"))?;
    let _ = feeder.join();
    if out.stdout.is_empty() {
        return Err(format!("xz produced nothing ({})", out.status));
    }
    Ok(out.stdout)
}

/// A module's bytes, decompressed if it is a `.ko.xz`.
pub(super) fn read_module(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if path.extension().is_some_and(|x| x == "xz") {
        xz_decompress(&bytes, "--single-stream")
    } else {
        Ok(bytes)
    }
}

/// Module name (with `_`, as in `depends=`) to file, for every module under `dir`.
pub(super) fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).map_err(|e| format!("cannot list {}: {e}", d.display()))? {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", d.display()))?;
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
                continue;
            }
            let file = entry.file_name().to_string_lossy().into_owned();
            let stem = file
                .strip_suffix(".ko")
                .or_else(|| file.strip_suffix(".ko.xz"));
            if let Some(stem) = stem {
                index.insert(stem.replace('-', "_"), path);
            }
        }
    }
    Ok(index)
}

/// `wanted` and everything they depend on, each after its dependencies.
pub(super) fn load_order(
    wanted: &[&str],
    available: &BTreeMap<String, PathBuf>,
    depends: &dyn Fn(&Path) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        available: &BTreeMap<String, PathBuf>,
        depends: &dyn Fn(&Path) -> Result<Vec<String>>,
        visiting: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result {
        if order.iter().any(|m| m == name) {
            return Ok(());
        }
        if visiting.iter().any(|m| m == name) {
            return Err(format!("module dependency cycle through {name}"));
        }
        let path = available
            .get(name)
            .ok_or_else(|| format!("kernel module {name} is not in the kernel package"))?;
        visiting.push(name.to_string());
        for dep in depends(path)? {
            visit(&dep, available, depends, visiting, order)?;
        }
        visiting.pop();
        order.push(name.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    for name in wanted {
        visit(name, available, depends, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_load_first() {
        let available: BTreeMap<String, PathBuf> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| (n.to_string(), PathBuf::from(n)))
            .collect();
        let deps = |p: &Path| -> Result<Vec<String>> {
            Ok(match p.to_str().unwrap() {
                "a" => vec!["b".into(), "c".into()],
                "b" => vec!["c".into()],
                _ => vec![],
            })
        };
        assert_eq!(
            load_order(&["a", "d"], &available, &deps).unwrap(),
            ["c", "b", "a", "d"]
        );
        assert!(load_order(&["x"], &available, &deps).is_err());
        let cyclic = |p: &Path| -> Result<Vec<String>> {
            Ok(vec![if p == Path::new("a") { "b" } else { "a" }.into()])
        };
        assert!(load_order(&["a"], &available, &cyclic).is_err());
    }
}
