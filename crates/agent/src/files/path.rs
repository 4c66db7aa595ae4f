//! The lexical half of the path policy: what can be decided from the text of
//! a path alone, before any file is touched. The dispatcher's policy check
//! ([`crate::policy`]) runs it for every file call; the race-free half,
//! which looks at the file system, is [`super::resolve`].

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
}

impl Lexical<'_> {
    /// The path as the agent understands it: the root and the components,
    /// with `.` and repeated slashes gone.
    pub fn display(&self) -> String {
        let mut s = self.root.display().to_string();
        for c in &self.rel {
            if !s.ends_with('/') {
                s.push('/');
            }
            s.push_str(c);
        }
        s
    }
}

/// Check `path` against `roots` (the `allowed_file_paths`): absolute, no NUL,
/// no `..` component, not too long, naming a file (not a directory), and
/// inside one of the roots by whole components (`/tmpfoo` is not inside
/// `/tmp`). The longest matching root wins.
pub fn check<'a>(path: &'a str, roots: &'a [PathBuf]) -> Result<Lexical<'a>, Reason> {
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
    Ok(Lexical { root, rel })
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
        let ok = |p: &str| check(p, &r).map(|l| l.display());
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
            assert_eq!(check(p, &r), Err(want), "{p:?}");
        }
        let long = format!("/tmp/{}", "a".repeat(NAME_MAX + 1));
        assert_eq!(check(&long, &r), Err(Reason::TooLong));
        let deep = format!("/tmp{}", "/a".repeat(PATH_MAX / 2));
        assert_eq!(check(&deep, &r), Err(Reason::TooLong));
        // The longest root wins.
        let nested = vec![PathBuf::from("/srv"), PathBuf::from("/srv/up")];
        let l = check("/srv/up/f", &nested).unwrap();
        assert_eq!((l.root, l.rel), (Path::new("/srv/up"), vec!["f"]));
    }
}
