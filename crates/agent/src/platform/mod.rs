//! Operating-system specifics, behind one set of names.
//!
//! `linux.rs` and `windows.rs` export the same functions; callers use
//! `platform::x` and never mention the platform.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;
