//! Windows.

use kvm_agent_protocol::methods::core::OsFamily;

/// This guest's OS family.
pub const OS_FAMILY: OsFamily = OsFamily::Windows;

/// Identifies the current boot. Windows has no boot id; until the Windows
/// platform code lands this is empty, which hosts treat as unknown.
pub fn boot_id() -> String {
    String::new()
}
