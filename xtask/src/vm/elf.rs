//! Just enough ELF64 (little-endian) reading for the VM images: the
//! `.modinfo` strings of a kernel module, and whether a binary asks for a
//! program interpreter (a dynamic loader).

use crate::Result;

const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;
const DT_NEEDED: usize = 1;
const SHT_SYMTAB: u32 = 2;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

fn check_header(b: &[u8], what: &str) -> Result {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return Err(format!("{what} is not a little-endian 64-bit ELF file"));
    }
    Ok(())
}

/// The NUL-separated `key=value` strings of the `.modinfo` section.
pub fn modinfo(b: &[u8], what: &str) -> Result<Vec<String>> {
    check_header(b, what)?;
    let bad = || format!("{what}: malformed ELF section table");
    let shoff = u64_at(b, 0x28).ok_or_else(bad)?;
    let shentsize = usize::from(u16_at(b, 0x3a).ok_or_else(bad)?);
    let shnum = usize::from(u16_at(b, 0x3c).ok_or_else(bad)?);
    let shstrndx = usize::from(u16_at(b, 0x3e).ok_or_else(bad)?);
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(b, at)?, u64_at(b, at + 0x18)?, u64_at(b, at + 0x20)?))
    };
    let (_, str_off, str_size) = section(shstrndx).ok_or_else(bad)?;
    let names = b.get(str_off..str_off + str_size).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name, off, size) = section(i).ok_or_else(bad)?;
        let name = names.get(name as usize..).ok_or_else(bad)?;
        let name = name.split(|&c| c == 0).next().unwrap_or_default();
        if name == b".modinfo" {
            let data = b.get(off..off + size).ok_or_else(bad)?;
            return Ok(data
                .split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
    }
    Err(format!("{what} has no .modinfo section"))
}

/// The module names in `depends=` (empty when it depends on nothing).
pub fn depends(modinfo: &[String]) -> Vec<String> {
    modinfo
        .iter()
        .find_map(|kv| kv.strip_prefix("depends="))
        .map(|list| {
            list.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// True when the program headers contain no `PT_INTERP`: the binary runs
/// without a dynamic loader (static, or static-pie).
pub fn is_static(b: &[u8], what: &str) -> Result<bool> {
    check_header(b, what)?;
    let bad = || format!("{what}: malformed ELF program headers");
    let phoff = u64_at(b, 0x20).ok_or_else(bad)?;
    let phentsize = usize::from(u16_at(b, 0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(b, 0x38).ok_or_else(bad)?);
    for i in 0..phnum {
        let kind = u32_at(b, phoff + i * phentsize).ok_or_else(bad)?;
        if kind == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// How many shared libraries the binary names (`DT_NEEDED` entries of its
/// `PT_DYNAMIC` segment). A static-pie binary has a dynamic segment, for its
/// own relocations, but needs nothing.
pub fn needed_libraries(b: &[u8], what: &str) -> Result<usize> {
    check_header(b, what)?;
    let bad = || format!("{what}: malformed ELF program headers");
    let phoff = u64_at(b, 0x20).ok_or_else(bad)?;
    let phentsize = usize::from(u16_at(b, 0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(b, 0x38).ok_or_else(bad)?);
    let mut needed = 0;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if u32_at(b, at).ok_or_else(bad)? != PT_DYNAMIC {
            continue;
        }
        let off = u64_at(b, at + 0x08).ok_or_else(bad)?;
        let size = u64_at(b, at + 0x20).ok_or_else(bad)?;
        for entry in (off..off + size).step_by(16) {
            match u64_at(b, entry).ok_or_else(bad)? {
                0 => break,
                DT_NEEDED => needed += 1,
                _ => {}
            }
        }
    }
    Ok(needed)
}

/// True when the binary still has a symbol table (`.symtab`): not stripped.
pub fn has_symtab(b: &[u8], what: &str) -> Result<bool> {
    check_header(b, what)?;
    let bad = || format!("{what}: malformed ELF section table");
    let shoff = u64_at(b, 0x28).ok_or_else(bad)?;
    let shentsize = usize::from(u16_at(b, 0x3a).ok_or_else(bad)?);
    let shnum = usize::from(u16_at(b, 0x3c).ok_or_else(bad)?);
    for i in 0..shnum {
        if u32_at(b, shoff + i * shentsize + 4).ok_or_else(bad)? == SHT_SYMTAB {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_is_dynamic() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static(&me, "test binary").unwrap());
        assert!(needed_libraries(&me, "test binary").unwrap() > 0);
    }

    #[test]
    fn rejects_what_is_not_elf() {
        assert!(is_static(b"#!/bin/sh\n", "script").is_err());
        assert!(modinfo(&[0u8; 100], "zeros").is_err());
    }

    #[test]
    fn depends_lists() {
        let info: Vec<String> = ["license=GPL", "depends=virtio,virtio_ring", "name=x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(depends(&info), ["virtio", "virtio_ring"]);
        assert!(depends(&["depends=".to_string()]).is_empty());
        assert!(depends(&[]).is_empty());
    }
}
