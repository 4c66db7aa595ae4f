//! Linux.

use kvm_agent_protocol::methods::core::OsFamily;

/// This guest's OS family.
pub const OS_FAMILY: OsFamily = OsFamily::Linux;

/// Identifies the current boot; the kernel makes a new one at every boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| {
            log::warn!("cannot read the boot id: {e}");
            String::new()
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_id_is_a_uuid() {
        let id = super::boot_id();
        assert_eq!(id.len(), 36, "{id:?}");
        assert_eq!(id.matches('-').count(), 4, "{id:?}");
    }
}
