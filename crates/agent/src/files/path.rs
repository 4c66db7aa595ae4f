//! The lexical half of the path policy: what can be decided from the text of
//! a path alone, before any file is touched. The dispatcher's policy check
//! ([`crate::policy`]) runs it for every file call; the race-free half,
//! which looks at the file system, is [`super::resolve`].
//!
//! Windows paths follow their own rules ([`check_windows`], pure text, so
//! its table also runs on Linux): drive-letter paths only (`C:\...` or
//! `C:/...`); refused are drive-relative (`C:x`) and rooted (`\x`) paths,
//! UNC (`\\server\share`) and device paths (`\\?\`, `\\.\`, `\??\`),
//! alternate data streams (any `:` after the drive), reserved device names
//! in any component (`CON`, `PRN`, `AUX`, `NUL`, `COM0`-`COM9`, `LPT0`-`LPT9`,
//! also with `¹²³`, `CONIN$`, `CONOUT$`, `CLOCK$`; with any extension,
//! trailing dots or spaces, in any case), names ending in a dot or a space
//! (Win32 strips them: an alias), names with `~` and a digit (possible 8.3
//! short names, which alias long names: refused, not resolved), the
//! characters `<>"|?*` and controls, `..`, NUL, names over 255 UTF-16 units
//! and paths over [`WIN_PATH_MAX`]. Allowed directories match
//! case-insensitively.

use std::path::{Component, Path, PathBuf};

use super::Reason;

/// Longest path accepted, in bytes (Linux `PATH_MAX` counts the NUL).
pub const PATH_MAX: usize = 4095;
/// Longest name of one component, in bytes (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// A path that passed the lexical checks: the allowed directory it is in,
/// and its components below it (never empty, never `.` or `..`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lexical<'a> {
    /// The allowed directory, as configured.
    pub root: &'a Path,
    /// The components below it; the last is the file's name.
    pub rel: Vec<&'a str>,
    /// The separator [`Lexical::display`] puts between components.
    pub sep: char,
}

impl Lexical<'_> {
    /// The path as the agent understands it: the root and the components,
    /// with `.` and repeated slashes gone.
    pub fn display(&self) -> String {
        let mut s = self.root.display().to_string();
        for c in &self.rel {
            if !s.ends_with(self.sep) {
                s.push(self.sep);
            }
            s.push_str(c);
        }
        s
    }
}

/// The rules of this platform: [`check_unix`] or [`check_windows`].
pub fn check<'a>(path: &'a str, roots: &'a [PathBuf]) -> Result<Lexical<'a>, Reason> {
    if cfg!(windows) {
        check_windows(path, roots)
    } else {
        check_unix(path, roots)
    }
}

/// Check `path` against `roots` (the `allowed_file_paths`): absolute, no NUL,
/// no `..` component, not too long, naming a file (not a directory), and
/// inside one of the roots by whole components (`/tmpfoo` is not inside
/// `/tmp`). The longest matching root wins.
pub fn check_unix<'a>(path: &'a str, roots: &'a [PathBuf]) -> Result<Lexical<'a>, Reason> {
    if path.is_empty() {
        return Err(Reason::Empty);
    }
    if path.contains('\0') {
        return Err(Reason::Nul);
    }
    if path.len() > PATH_MAX {
        return Err(Reason::TooLong);
    }
    if !path.starts_with('/') {
        return Err(Reason::Relative);
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if parts.contains(&"..") {
        return Err(Reason::DotDot);
    }
    if parts.iter().any(|c| c.len() > NAME_MAX) {
        return Err(Reason::TooLong);
    }
    let parts: Vec<&str> = parts.into_iter().filter(|c| *c != ".").collect();
    let mut best: Option<(&Path, usize)> = None;
    for root in roots {
        let rc: Vec<&str> = root
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => n.to_str(),
                _ => None,
            })
            .collect();
        if parts.len() >= rc.len()
            && parts[..rc.len()] == rc[..]
            && best.is_none_or(|(_, n)| rc.len() > n)
        {
            best = Some((root.as_path(), rc.len()));
        }
    }
    let Some((root, n)) = best else {
        return Err(Reason::OutsideAllowed);
    };
    let rel = parts[n..].to_vec();
    // The root itself, or a name ending in `/` or `/.`: a directory.
    let last = path.trim_end_matches('/');
    if rel.is_empty() || path.ends_with('/') || last.ends_with("/.") {
        return Err(Reason::Directory);
    }
    Ok(Lexical {
        root,
        rel,
        sep: '/',
    })
}

/// Longest Windows path accepted, in UTF-16 units (the agent opens paths
/// with the `\\?\` prefix, whose limit is 32767).
pub const WIN_PATH_MAX: usize = 32_000;

fn is_win_sep(c: char) -> bool {
    c == '\\' || c == '/'
}

/// Split a drive-letter path `X:\...` into its drive and its components
/// (empty ones dropped), or say why it is not one.
pub fn win_drive_parts(path: &str) -> Result<(char, Vec<&str>), Reason> {
    let mut chars = path.chars();
    let (a, b, c) = (chars.next(), chars.next(), chars.next());
    if a.is_some_and(is_win_sep) {
        if b.is_some_and(is_win_sep) {
            // `\\?\`, `\\.\` (and `//?/`, `//./`): device paths; else UNC.
            return Err(if matches!(c, Some('?' | '.')) {
                Reason::DevicePath
            } else {
                Reason::Unc
            });
        }
        // `\??\` is the NT object namespace; other rooted paths have no drive.
        if path.starts_with("\\??\\") || path.starts_with("/??/") {
            return Err(Reason::DevicePath);
        }
        return Err(Reason::Relative);
    }
    match (a, b, c) {
        (Some(d), Some(':'), Some(s)) if d.is_ascii_alphabetic() && is_win_sep(s) => Ok((
            d.to_ascii_uppercase(),
            path[3..]
                .split(is_win_sep)
                .filter(|c| !c.is_empty())
                .collect(),
        )),
        _ => Err(Reason::Relative),
    }
}

/// Whether two names are equal ignoring case (as NTFS compares them, to
/// the precision of Unicode's simple upper-casing).
pub fn eq_ignore_case(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_uppercase)
        .eq(b.chars().flat_map(char::to_uppercase))
}

/// Whether `name` is a reserved DOS device name, whatever its extension,
/// trailing dots and spaces, and case.
pub fn is_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).trim_end_matches(' ');
    let up: String = stem.chars().flat_map(char::to_uppercase).collect();
    if matches!(
        up.as_str(),
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$" | "CLOCK$"
    ) {
        return true;
    }
    let mut cs = up.chars();
    let head: String = cs.by_ref().take(3).collect();
    let rest: Vec<char> = cs.collect();
    (head == "COM" || head == "LPT")
        && rest.len() == 1
        && matches!(rest[0], '0'..='9' | '\u{b9}' | '\u{b2}' | '\u{b3}')
}

/// Whether `name` could be an 8.3 short name (a `~` followed by a digit).
pub fn is_short_name(name: &str) -> bool {
    name.as_bytes()
        .windows(2)
        .any(|w| w[0] == b'~' && w[1].is_ascii_digit())
}

/// The reason one component of a Windows path is refused, if any.
fn win_component(c: &str) -> Option<Reason> {
    if c.encode_utf16().count() > NAME_MAX {
        return Some(Reason::TooLong);
    }
    if c.contains(':') {
        return Some(Reason::Stream);
    }
    if c.chars()
        .any(|ch| matches!(ch, '<' | '>' | '"' | '|' | '?' | '*' | '\u{1}'..='\u{1f}'))
    {
        return Some(Reason::InvalidCharacter);
    }
    if c.ends_with('.') || c.ends_with(' ') {
        return Some(Reason::TrailingDotOrSpace);
    }
    if is_device_name(c) {
        return Some(Reason::DeviceName);
    }
    if is_short_name(c) {
        return Some(Reason::ShortName);
    }
    None
}

/// Whether `root` can be an allowed directory on Windows: a drive-letter
/// path without `..` whose names pass the Windows rules (a root such as
/// `C:\PROGRA~1\x` would refuse every path below it). Checked with the
/// configuration.
pub fn check_windows_root(root: &Path) -> Result<(), Reason> {
    let s = root.to_str().ok_or(Reason::InvalidCharacter)?;
    if s.contains('\0') {
        return Err(Reason::Nul);
    }
    let (_, parts) = win_drive_parts(s)?;
    if parts.contains(&"..") {
        return Err(Reason::DotDot);
    }
    match parts
        .iter()
        .filter(|c| **c != ".")
        .find_map(|c| win_component(c))
    {
        Some(r) => Err(r),
        None => Ok(()),
    }
}

/// The Windows rules (see the module's documentation): `path` must be a
/// drive-letter path inside one of `roots` (compared case-insensitively,
/// by whole components; the longest wins). Roots that are not drive-letter
/// paths match nothing.
pub fn check_windows<'a>(path: &'a str, roots: &'a [PathBuf]) -> Result<Lexical<'a>, Reason> {
    if path.is_empty() {
        return Err(Reason::Empty);
    }
    if path.contains('\0') {
        return Err(Reason::Nul);
    }
    if path.encode_utf16().count() > WIN_PATH_MAX {
        return Err(Reason::TooLong);
    }
    let (drive, parts) = win_drive_parts(path)?;
    if parts.contains(&"..") {
        return Err(Reason::DotDot);
    }
    let parts: Vec<&str> = parts.into_iter().filter(|c| *c != ".").collect();
    if let Some(r) = parts.iter().find_map(|c| win_component(c)) {
        return Err(r);
    }
    let mut best: Option<(&Path, usize)> = None;
    for root in roots {
        let Some(Ok((rd, rc))) = root.to_str().map(win_drive_parts) else {
            continue;
        };
        let rc: Vec<&str> = rc.into_iter().filter(|c| *c != ".").collect();
        if rd == drive
            && parts.len() >= rc.len()
            && parts.iter().zip(&rc).all(|(a, b)| eq_ignore_case(a, b))
            && best.is_none_or(|(_, n)| rc.len() > n)
        {
            best = Some((root.as_path(), rc.len()));
        }
    }
    let Some((root, n)) = best else {
        return Err(Reason::OutsideAllowed);
    };
    let rel = parts[n..].to_vec();
    let last = path.trim_end_matches(is_win_sep);
    if rel.is_empty() || path.ends_with(is_win_sep) || last.ends_with("\\.") || last.ends_with("/.")
    {
        return Err(Reason::Directory);
    }
    Ok(Lexical {
        root,
        rel,
        sep: '\\',
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Vec<PathBuf> {
        vec![PathBuf::from("/tmp"), PathBuf::from("/var/tmp")]
    }

    #[test]
    fn lexical_rules() {
        let r = roots();
        let ok = |p: &str| check_unix(p, &r).map(|l| l.display());
        assert_eq!(ok("/tmp/a").unwrap(), "/tmp/a");
        assert_eq!(ok("//tmp//./a").unwrap(), "/tmp/a");
        assert_eq!(ok("/var/tmp/x/y").unwrap(), "/var/tmp/x/y");
        assert_eq!(ok("/tmp/%2e%2e/etc").unwrap(), "/tmp/%2e%2e/etc");
        assert_eq!(ok("/tmp/..."), Ok("/tmp/...".into()));
        for (p, want) in [
            ("", Reason::Empty),
            ("tmp/a", Reason::Relative),
            ("./tmp/a", Reason::Relative),
            ("/tmp/a\0b", Reason::Nul),
            ("/tmp/../etc/passwd", Reason::DotDot),
            ("/tmp/./../etc", Reason::DotDot),
            ("//tmp/../etc", Reason::DotDot),
            ("/tmp/a/..", Reason::DotDot),
            ("/tmpfoo/a", Reason::OutsideAllowed),
            ("/etc/passwd", Reason::OutsideAllowed),
            ("/", Reason::OutsideAllowed),
            ("/tmp", Reason::Directory),
            ("/tmp/", Reason::Directory),
            ("/tmp/a/", Reason::Directory),
            ("/tmp/a/.", Reason::Directory),
        ] {
            assert_eq!(check_unix(p, &r), Err(want), "{p:?}");
        }
        let long = format!("/tmp/{}", "a".repeat(NAME_MAX + 1));
        assert_eq!(check_unix(&long, &r), Err(Reason::TooLong));
        let deep = format!("/tmp{}", "/a".repeat(PATH_MAX / 2));
        assert_eq!(check_unix(&deep, &r), Err(Reason::TooLong));
        // The longest root wins.
        let nested = vec![PathBuf::from("/srv"), PathBuf::from("/srv/up")];
        let l = check_unix("/srv/up/f", &nested).unwrap();
        assert_eq!((l.root, l.rel), (Path::new("/srv/up"), vec!["f"]));
    }

    /// The Windows lexical table (pure text: it runs on every platform).
    #[test]
    fn windows_lexical_rules() {
        let r = vec![
            PathBuf::from(r"C:\ProgramData\KVM Manager Agent\transfer"),
            PathBuf::from(r"D:\Data"),
            PathBuf::from(r"\\server\share"),
        ];
        let ok = |p: &str| check_windows(p, &r).map(|l| l.display());
        let root = r"C:\ProgramData\KVM Manager Agent\transfer";
        assert_eq!(
            ok(&format!(r"{root}\a.txt")).unwrap(),
            format!(r"{root}\a.txt")
        );
        // Forward slashes, repeated separators and `.` are normalised; the
        // root matches in any case and is shown as configured.
        assert_eq!(
            ok(r"c:/programdata/kvm manager agent/TRANSFER//./sub/b.bin").unwrap(),
            format!(r"{root}\sub\b.bin")
        );
        assert_eq!(ok(r"d:\DATA\x").unwrap(), r"D:\Data\x");
        assert_eq!(
            ok(r"D:\Data\con-tent.txt").unwrap(),
            r"D:\Data\con-tent.txt"
        );
        assert_eq!(ok(r"D:\Data\COM10").unwrap(), r"D:\Data\COM10");
        assert_eq!(ok(r"D:\Data\a~b.txt").unwrap(), r"D:\Data\a~b.txt");
        assert_eq!(ok(r"D:\Data\.hidden").unwrap(), r"D:\Data\.hidden");
        for (p, want) in [
            ("", Reason::Empty),
            ("D:\\Data\\a\0b", Reason::Nul),
            (r"Data\x", Reason::Relative),
            (r"D:Data\x", Reason::Relative),
            (r"D:", Reason::Relative),
            (r"\Data\x", Reason::Relative),
            (r"/Data/x", Reason::Relative),
            (r"1:\Data\x", Reason::Relative),
            (r"\\server\share\x", Reason::Unc),
            (r"//server/share/x", Reason::Unc),
            (r"\\?\D:\Data\x", Reason::DevicePath),
            (r"//?/D:/Data/x", Reason::DevicePath),
            (r"\\.\D:\Data\x", Reason::DevicePath),
            (r"\\.\COM1", Reason::DevicePath),
            (r"\??\D:\Data\x", Reason::DevicePath),
            (r"D:\Data\..\Windows\win.ini", Reason::DotDot),
            (r"D:/Data/../Windows/win.ini", Reason::DotDot),
            (r"D:\Data\a\..\..\x", Reason::DotDot),
            (r"D:\Data\a/..\x", Reason::DotDot),
            (r"D:\Data\file.txt:evil", Reason::Stream),
            (r"D:\Data\file.txt::$DATA", Reason::Stream),
            (r"D:\Data\sub::$INDEX_ALLOCATION\x", Reason::Stream),
            (r"D:\Data\CON", Reason::DeviceName),
            (r"D:\Data\con.txt", Reason::DeviceName),
            (r"D:\Data\Nul.tar.gz", Reason::DeviceName),
            (r"D:\Data\aux \x", Reason::TrailingDotOrSpace),
            (r"D:\Data\PRN .txt", Reason::DeviceName),
            (r"D:\Data\com1", Reason::DeviceName),
            (r"D:\Data\LPT9.log", Reason::DeviceName),
            (r"D:\Data\COM0", Reason::DeviceName),
            ("D:\\Data\\COM\u{b9}", Reason::DeviceName),
            ("D:\\Data\\lpt\u{b2}.txt", Reason::DeviceName),
            ("D:\\Data\\COM\u{b3}", Reason::DeviceName),
            (r"D:\Data\CONIN$", Reason::DeviceName),
            (r"D:\Data\conout$.x", Reason::DeviceName),
            (r"D:\Data\nul\x", Reason::DeviceName),
            (r"D:\Data\file.txt.", Reason::TrailingDotOrSpace),
            (r"D:\Data\file.txt ", Reason::TrailingDotOrSpace),
            (r"D:\Data\sub.\x", Reason::TrailingDotOrSpace),
            (r"D:\Data\...", Reason::TrailingDotOrSpace),
            (r"D:\Data\PROGRA~1\x", Reason::ShortName),
            (r"D:\Data\LONGFI~12.TXT", Reason::ShortName),
            (r"D:\Data\.KVA-U~1.TMP", Reason::ShortName),
            (r"D:\Data\a*", Reason::InvalidCharacter),
            (r"D:\Data\a?b", Reason::InvalidCharacter),
            (r"D:\Data\<x>", Reason::InvalidCharacter),
            ("D:\\Data\\a\"b", Reason::InvalidCharacter),
            (r"D:\Data\a|b", Reason::InvalidCharacter),
            ("D:\\Data\\a\u{7}b", Reason::InvalidCharacter),
            (r"D:\Database\x", Reason::OutsideAllowed),
            (r"E:\Data\x", Reason::OutsideAllowed),
            (r"C:\Windows\System32\config\SAM", Reason::OutsideAllowed),
            (
                r"C:\ProgramData\KVM Manager Agent\x",
                Reason::OutsideAllowed,
            ),
            (r"D:\Data", Reason::Directory),
            (r"d:\data\", Reason::Directory),
            (r"D:\Data\sub\", Reason::Directory),
            (r"D:\Data\sub/", Reason::Directory),
            (r"D:\Data\sub\.", Reason::Directory),
        ] {
            assert_eq!(check_windows(p, &r), Err(want), "{p:?}");
        }
        let long = format!(r"D:\Data\{}", "a".repeat(NAME_MAX + 1));
        assert_eq!(check_windows(&long, &r), Err(Reason::TooLong));
        // 255 UTF-16 units is the limit, not 255 bytes.
        let wide = format!(r"D:\Data\{}", "é".repeat(NAME_MAX));
        assert!(check_windows(&wide, &r).is_ok());
        let deep = format!(r"D:\Data{}", r"\a".repeat(WIN_PATH_MAX / 2));
        assert_eq!(check_windows(&deep, &r), Err(Reason::TooLong));
        // The longest root wins, case-insensitively.
        let nested = vec![PathBuf::from(r"C:\srv"), PathBuf::from(r"C:\SRV\Up")];
        let l = check_windows(r"c:\srv\up\f", &nested).unwrap();
        assert_eq!((l.root, l.rel), (Path::new(r"C:\SRV\Up"), vec!["f"]));
        // Roots the configuration accepts on Windows.
        assert_eq!(check_windows_root(Path::new(r"C:\ProgramData\x")), Ok(()));
        assert_eq!(check_windows_root(Path::new(r"D:\")), Ok(()));
        for (root, want) in [
            (r"\\server\share", Reason::Unc),
            (r"\\?\C:\x", Reason::DevicePath),
            (r"C:x", Reason::Relative),
            (r"C:\a\..\b", Reason::DotDot),
            (r"C:\PROGRA~1\x", Reason::ShortName),
            (r"C:\x\con", Reason::DeviceName),
            (r"C:\x.\y", Reason::TrailingDotOrSpace),
        ] {
            assert_eq!(check_windows_root(Path::new(root)), Err(want), "{root}");
        }
    }
}
