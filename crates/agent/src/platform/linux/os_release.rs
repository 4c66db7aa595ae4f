//! os-release(5): `KEY=value` lines in a subset of shell syntax.
//!
//! Values are unquoted, 'single-quoted' (taken literally) or
//! "double-quoted" (where `\"`, `\\`, `` \` `` and `\$` are escapes); quoted
//! and unquoted pieces may be joined (`a"b c"`). An unquoted backslash escapes
//! the next character. Lines starting with `#` and blank lines are ignored,
//! and so are lines that are not assignments. A later assignment wins.

use std::collections::BTreeMap;

/// The assignments of an os-release file.
#[derive(Debug, Default)]
pub struct OsRelease(BTreeMap<String, String>);

impl OsRelease {
    /// The value of `key`, when set and not empty.
    pub fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).filter(|v| !v.is_empty()).cloned()
    }
}

/// Parse os-release text; never fails (bad lines are skipped).
pub fn parse(text: &str) -> OsRelease {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        if let Some(value) = unquote(raw) {
            map.insert(key.to_owned(), value);
        }
    }
    OsRelease(map)
}

/// The shell word `raw` stands for; None when a quote is left open.
fn unquote(raw: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => out.push(c),
                }
            },
            '"' => loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => match chars.next()? {
                        c @ ('"' | '\\' | '`' | '$') => out.push(c),
                        c => {
                            out.push('\\');
                            out.push(c);
                        }
                    },
                    c => out.push(c),
                }
            },
            '\\' => {
                if let Some(c) = chars.next() {
                    out.push(c);
                }
            }
            // An unquoted space or comment ends the word.
            c if c.is_whitespace() => break,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian() {
        let r = parse(include_str!("fixtures/os-release-debian"));
        assert_eq!(r.get("NAME").as_deref(), Some("Debian GNU/Linux"));
        assert_eq!(r.get("VERSION").as_deref(), Some("12 (bookworm)"));
        assert_eq!(r.get("ID").as_deref(), Some("debian"));
        assert_eq!(r.get("VERSION_ID").as_deref(), Some("12"));
        assert_eq!(
            r.get("PRETTY_NAME").as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }

    #[test]
    fn quoting_rules() {
        let text = "# a comment\n\
                    \n\
                    NAME='Single \"quoted\" $HOME'\n\
                    PRETTY_NAME=\"Say \\\"hi\\\" \\$5 \\\\ \\n\"\n\
                    ID=plain\n\
                    VERSION=joined\"  part\"'s'\n\
                    VERSION_ID=  \n\
                    BROKEN=\"never closed\n\
                    not an assignment\n\
                    ID_LIKE=a\\ b # trailing comment\n\
                    ID=later-wins\n";
        let r = parse(text);
        assert_eq!(r.get("NAME").as_deref(), Some("Single \"quoted\" $HOME"));
        assert_eq!(
            r.get("PRETTY_NAME").as_deref(),
            Some("Say \"hi\" $5 \\ \\n")
        );
        assert_eq!(r.get("ID").as_deref(), Some("later-wins"));
        assert_eq!(r.get("VERSION").as_deref(), Some("joined  parts"));
        assert_eq!(r.get("VERSION_ID"), None);
        assert_eq!(r.get("BROKEN"), None);
        assert_eq!(r.get("ID_LIKE").as_deref(), Some("a b"));
        assert_eq!(parse("").get("NAME"), None);
    }
}
