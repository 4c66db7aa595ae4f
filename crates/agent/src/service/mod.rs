//! Running as a system service.
//!
//! On Linux there is nothing here: systemd starts the agent in the
//! foreground and stops it with SIGTERM (`packaging/systemd`). On Windows,
//! `kvm-manager-agent.exe --service` runs under the Service Control Manager
//! ([`windows`]): it reports its state to the SCM, turns STOP, SHUTDOWN and
//! PRESHUTDOWN into the same graceful drain as SIGTERM
//! ([`crate::server::run_until`]), logs to the Event Log, and sets its own
//! recovery actions (restart on failure). The MSI
//! (`packaging/windows/kvm-manager-agent.wxs`) registers the service.

#[cfg(windows)]
pub mod windows;
