//! `get_info`: OS, names, interfaces, boot id, uptime, time zone.
//!
//! Interfaces matching `[info] hide_interfaces` are left out unless the host
//! asks for `all_interfaces`; the loopback is listed unless a pattern names it.

use kvm_agent_protocol::methods::info::{GetInfoParams, GuestInfo, Interface};
use kvm_agent_protocol::{ErrorCode, ErrorObject, PROTOCOL_VERSION};

use crate::config::InfoSection;
use crate::context::Context;
use crate::platform::{self, PlatformError};

/// Why `get_info` failed.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    /// A source could not be read: -32003 (-32006 where the platform has none).
    #[error(transparent)]
    Source(#[from] PlatformError),
    /// The worker thread panicked: -32603.
    #[error("the get_info worker failed: {0}")]
    Worker(String),
}

impl From<&InfoError> for ErrorObject {
    fn from(e: &InfoError) -> Self {
        match e {
            InfoError::Source(p) => p.to_error_object(),
            InfoError::Worker(_) => ErrorObject::new(ErrorCode::InternalError)
                .data(serde_json::json!({ "method": "get_info" })),
        }
    }
}

/// Describe the guest. The reads run on a blocking thread: they touch /etc
/// files and netlink.
pub async fn get(ctx: &Context, params: GetInfoParams) -> Result<GuestInfo, InfoError> {
    let filter = ctx.config.info.clone();
    let boot_id = ctx.boot_id.clone();
    tokio::task::spawn_blocking(move || collect(&filter, params, boot_id))
        .await
        .map_err(|e| InfoError::Worker(e.to_string()))?
}

/// Gather everything, synchronously.
pub fn collect(
    filter: &InfoSection,
    params: GetInfoParams,
    boot_id: String,
) -> Result<GuestInfo, InfoError> {
    let hostname = platform::hostname()?;
    Ok(GuestInfo {
        os: platform::os_info()?,
        fqdn: platform::fqdn(&hostname),
        hostname,
        interfaces: filter_interfaces(platform::interfaces()?, filter, params.all_interfaces),
        boot_id,
        uptime_seconds: platform::uptime_seconds()?,
        timezone: platform::timezone(),
        agent_version: crate::AGENT_VERSION.to_owned(),
        protocol_version: PROTOCOL_VERSION.to_owned(),
    })
}

/// Apply the `hide_interfaces` filter unless `all` is set.
pub fn filter_interfaces(list: Vec<Interface>, filter: &InfoSection, all: bool) -> Vec<Interface> {
    if all {
        return list;
    }
    list.into_iter()
        .filter(|i| !filter.hides_interface(&i.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str) -> Interface {
        Interface {
            name: name.into(),
            mac: None,
            mtu: None,
            flags: Vec::new(),
            addresses: Vec::new(),
        }
    }

    #[test]
    fn filter_hides_plumbing_unless_all() {
        let list: Vec<Interface> = ["lo", "eth0", "docker0", "veth1a2b", "br-9f", "cni0"]
            .into_iter()
            .map(iface)
            .collect();
        let f = InfoSection::default();
        let names = |l: Vec<Interface>| l.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(
            names(filter_interfaces(list.clone(), &f, false)),
            ["lo", "eth0"]
        );
        assert_eq!(names(filter_interfaces(list, &f, true)).len(), 6);
    }

    /// Under Wine (and on Windows) the Win32 sources answer: the OS is
    /// Windows, the host has a name and the loopback adapter is listed.
    #[cfg(windows)]
    #[test]
    fn collect_on_windows() {
        let info = collect(
            &InfoSection::default(),
            GetInfoParams::default(),
            "x".into(),
        )
        .unwrap();
        assert_eq!(
            info.os.family,
            kvm_agent_protocol::methods::core::OsFamily::Windows
        );
        assert!(!info.hostname.is_empty());
        assert!(info.uptime_seconds > 0.0);
        assert!(!info.interfaces.is_empty());
        assert_eq!(info.protocol_version, PROTOCOL_VERSION);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn collect_on_this_machine() {
        let info = collect(
            &InfoSection::default(),
            GetInfoParams::default(),
            "x".into(),
        )
        .unwrap();
        assert!(!info.hostname.is_empty());
        assert!(info.uptime_seconds > 0.0);
        assert!(info.interfaces.iter().any(|i| i.name == "lo"));
        assert_eq!(info.protocol_version, PROTOCOL_VERSION);
    }

    #[cfg(unix)]
    #[test]
    fn io_errors_name_the_file() {
        let e = InfoError::Source(PlatformError::io(
            "/proc/uptime",
            std::io::Error::from_raw_os_error(libc::EACCES),
        ));
        let wire = ErrorObject::from(&e);
        assert_eq!(wire.kind(), Some(ErrorCode::Io));
        let data = wire.data.unwrap();
        assert_eq!(data["path"], "/proc/uptime");
        assert_eq!(data["os_error"], libc::EACCES);
    }
}
