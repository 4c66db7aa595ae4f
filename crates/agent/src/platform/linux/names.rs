//! Host names without DNS: uname(2) for the node name, /etc/hostname and
//! /etc/hosts for the fully qualified name.

use crate::platform::PlatformError;

/// The uname(2) fields the agent reports.
#[derive(Debug)]
pub struct Uname {
    pub nodename: String,
    pub release: String,
    pub version: String,
    pub machine: String,
}

pub fn uname() -> Result<Uname, PlatformError> {
    // SAFETY: utsname is plain old data; all zeroes is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(PlatformError::io("uname", std::io::Error::last_os_error()));
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(Uname {
        nodename: field(&uts.nodename),
        release: field(&uts.release),
        version: field(&uts.version),
        machine: field(&uts.machine),
    })
}

/// The fully qualified name of `hostname`, without DNS:
///
/// 1. the host name itself when it already holds a dot;
/// 2. else /etc/hostname when it names this host with a domain
///    (`web-01.example.net` for host `web-01`);
/// 3. else the canonical name (first name) of the /etc/hosts line that
///    carries the host name, when it holds a dot and is not a `localhost`
///    name;
/// 4. else none.
pub fn fqdn_from(
    hostname: &str,
    etc_hostname: Option<&str>,
    hosts: Option<&str>,
) -> Option<String> {
    let usable = |name: &str| {
        name.contains('.')
            && !name.starts_with('.')
            && !name.ends_with('.')
            && !name.starts_with("localhost")
    };
    if usable(hostname) {
        return Some(hostname.to_owned());
    }
    if let Some(first) = etc_hostname.and_then(|t| {
        t.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
    }) {
        if first
            .strip_prefix(hostname)
            .is_some_and(|r| r.starts_with('.'))
            && usable(first)
        {
            return Some(first.to_owned());
        }
    }
    for line in hosts?.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let (Some(_address), Some(canonical)) = (fields.next(), fields.next()) else {
            continue;
        };
        let carries = canonical == hostname || fields.any(|alias| alias == hostname);
        let matches_short = canonical
            .strip_prefix(hostname)
            .is_some_and(|r| r.starts_with('.'));
        if (carries || matches_short) && usable(canonical) {
            return Some(canonical.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn_from_hosts_canonical_name() {
        let hosts = "127.0.0.1 localhost\n# 127.0.1.1 web-01.wrong.net web-01\n\
                     127.0.1.1\tweb-01.example.net  web-01 # the host\n";
        assert_eq!(
            fqdn_from("web-01", Some("web-01\n"), Some(hosts)).as_deref(),
            Some("web-01.example.net")
        );
    }

    #[test]
    fn fqdn_none_without_a_domain() {
        let hosts = "127.0.0.1 localhost\n127.0.0.1 vm\n127.0.0.1 localhost.localdomain vm2\n";
        assert_eq!(fqdn_from("vm", Some("vm\n"), Some(hosts)), None);
        assert_eq!(fqdn_from("vm2", None, Some(hosts)), None);
        assert_eq!(fqdn_from("vm", None, None), None);
    }

    #[test]
    fn fqdn_from_hostname_or_etc_hostname() {
        assert_eq!(
            fqdn_from("a.example.org", None, None).as_deref(),
            Some("a.example.org")
        );
        assert_eq!(
            fqdn_from("a", Some("# comment\na.example.org\n"), None).as_deref(),
            Some("a.example.org")
        );
        // /etc/hostname naming another host is ignored.
        assert_eq!(fqdn_from("a", Some("b.example.org\n"), None), None);
    }

    #[test]
    fn uname_answers() {
        let u = uname().unwrap();
        assert!(!u.release.is_empty() && !u.machine.is_empty());
    }
}
