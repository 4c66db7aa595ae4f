//! Network interfaces from getifaddrs(3) (glibc asks the kernel over
//! netlink: RTM_GETLINK and RTM_GETADDR; no name service is involved) and
//! MTUs from /sys/class/net/NAME/mtu.
//!
//! getifaddrs gives one AF_PACKET entry per interface (index, MAC, flags),
//! so interfaces without addresses are listed too, and one entry per
//! address. [`assemble`] turns the raw entries into interfaces and is
//! unit-tested without the kernel.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kvm_agent_protocol::methods::info::{Interface, IpAddress};

use crate::platform::PlatformError;

/// What one getifaddrs entry says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawAddr {
    /// The link itself: kernel index and hardware address.
    Link { index: u32, mac: Vec<u8> },
    /// An address with its netmask.
    Ip { address: IpAddr, netmask: IpAddr },
    /// An entry without an address we report.
    Other,
}

/// One getifaddrs entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEntry {
    pub name: String,
    pub flags: u32,
    pub addr: RawAddr,
}

/// Flag bits reported, in this order, with their names.
const FLAGS: &[(u32, &str)] = &[
    (libc::IFF_UP as u32, "up"),
    (libc::IFF_RUNNING as u32, "running"),
    (0x10000, "lower_up"),
    (0x20000, "dormant"),
    (libc::IFF_LOOPBACK as u32, "loopback"),
    (libc::IFF_BROADCAST as u32, "broadcast"),
    (libc::IFF_POINTOPOINT as u32, "pointopoint"),
    (libc::IFF_MULTICAST as u32, "multicast"),
    (libc::IFF_NOARP as u32, "noarp"),
    (libc::IFF_PROMISC as u32, "promisc"),
    (libc::IFF_ALLMULTI as u32, "allmulti"),
    (libc::IFF_MASTER as u32, "master"),
    (libc::IFF_SLAVE as u32, "slave"),
];

/// Lower-case names of the set flags.
pub fn flag_names(flags: u32) -> Vec<String> {
    FLAGS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

/// Prefix length of a netmask: its leading one bits.
pub fn prefix_len(netmask: IpAddr) -> u8 {
    match netmask {
        IpAddr::V4(m) => u32::from(m).leading_ones() as u8,
        IpAddr::V6(m) => u128::from(m).leading_ones() as u8,
    }
}

/// `aa:bb:...` in lower case; None for an empty or all-zero address (the
/// loopback's, tunnels').
pub fn format_mac(mac: &[u8]) -> Option<String> {
    if mac.iter().all(|b| *b == 0) {
        return None;
    }
    Some(
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Group raw entries by interface, in kernel index order (interfaces
/// without a link entry last, by name); addresses in the order the kernel
/// gave them. `mtu` looks up an interface's MTU.
pub fn assemble(entries: &[RawEntry], mtu: impl Fn(&str) -> Option<u32>) -> Vec<Interface> {
    struct Acc {
        index: u32,
        interface: Interface,
    }
    let mut by_name: BTreeMap<String, Acc> = BTreeMap::new();
    for e in entries {
        let acc = by_name.entry(e.name.clone()).or_insert_with(|| Acc {
            index: u32::MAX,
            interface: Interface {
                name: e.name.clone(),
                mac: None,
                mtu: None,
                flags: flag_names(e.flags),
                addresses: Vec::new(),
            },
        });
        match &e.addr {
            RawAddr::Link { index, mac } => {
                acc.index = *index;
                acc.interface.mac = format_mac(mac);
                acc.interface.flags = flag_names(e.flags);
            }
            RawAddr::Ip { address, netmask } => acc.interface.addresses.push(IpAddress {
                address: *address,
                prefix_len: prefix_len(*netmask),
            }),
            RawAddr::Other => {}
        }
    }
    let mut list: Vec<Acc> = by_name.into_values().collect();
    list.sort_by(|a, b| (a.index, &a.interface.name).cmp(&(b.index, &b.interface.name)));
    list.into_iter()
        .map(|mut a| {
            a.interface.mtu = mtu(&a.interface.name);
            a.interface
        })
        .collect()
}

/// The MTU from sysfs.
fn sys_mtu(name: &str) -> Option<u32> {
    if name.contains('/') || name.starts_with('.') {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Every interface the kernel knows.
pub fn interfaces() -> Result<Vec<Interface>, PlatformError> {
    Ok(assemble(&read_ifaddrs()?, sys_mtu))
}

/// Read the kernel's interface and address list.
fn read_ifaddrs() -> Result<Vec<RawEntry>, PlatformError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: a valid out pointer; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(PlatformError::io(
            "getifaddrs",
            std::io::Error::last_os_error(),
        ));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: the pointers are null or point to sockaddrs of the family
        // they announce, owned by the list.
        let addr = unsafe { raw_addr(ifa.ifa_addr, ifa.ifa_netmask) };
        out.push(RawEntry {
            name,
            flags: ifa.ifa_flags,
            addr,
        });
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Decode one entry's address.
///
/// # Safety
/// `addr` and `netmask` are null or point to valid sockaddrs whose size
/// matches their family.
unsafe fn raw_addr(addr: *const libc::sockaddr, netmask: *const libc::sockaddr) -> RawAddr {
    if addr.is_null() {
        return RawAddr::Other;
    }
    // SAFETY: addr is a valid sockaddr (caller).
    let family = i32::from(unsafe { (*addr).sa_family });
    match family {
        libc::AF_PACKET => {
            // SAFETY: an AF_PACKET address is a sockaddr_ll.
            let ll = unsafe { &*(addr as *const libc::sockaddr_ll) };
            let len = usize::from(ll.sll_halen).min(ll.sll_addr.len());
            RawAddr::Link {
                index: ll.sll_ifindex as u32,
                mac: ll.sll_addr[..len].to_vec(),
            }
        }
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a sockaddr_in, and so is its netmask.
            let a = unsafe { &*(addr as *const libc::sockaddr_in) };
            let address = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            let netmask = if netmask.is_null() {
                Ipv4Addr::BROADCAST
            } else {
                // SAFETY: as above.
                let m = unsafe { &*(netmask as *const libc::sockaddr_in) };
                Ipv4Addr::from(u32::from_be(m.sin_addr.s_addr))
            };
            RawAddr::Ip {
                address: IpAddr::V4(address),
                netmask: IpAddr::V4(netmask),
            }
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6, and so is its netmask.
            let a = unsafe { &*(addr as *const libc::sockaddr_in6) };
            let address = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let netmask = if netmask.is_null() {
                Ipv6Addr::from(u128::MAX)
            } else {
                // SAFETY: as above.
                let m = unsafe { &*(netmask as *const libc::sockaddr_in6) };
                Ipv6Addr::from(m.sin6_addr.s6_addr)
            };
            RawAddr::Ip {
                address: IpAddr::V6(address),
                netmask: IpAddr::V6(netmask),
            }
        }
        _ => RawAddr::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: u32 = (libc::IFF_UP | libc::IFF_RUNNING) as u32;

    fn link(name: &str, index: u32, flags: u32, mac: &[u8]) -> RawEntry {
        RawEntry {
            name: name.into(),
            flags,
            addr: RawAddr::Link {
                index,
                mac: mac.to_vec(),
            },
        }
    }

    fn ip(name: &str, address: &str, netmask: &str) -> RawEntry {
        RawEntry {
            name: name.into(),
            flags: UP,
            addr: RawAddr::Ip {
                address: address.parse().unwrap(),
                netmask: netmask.parse().unwrap(),
            },
        }
    }

    #[test]
    fn interfaces_are_grouped_in_index_order() {
        let lo = (libc::IFF_LOOPBACK as u32) | UP;
        let entries = [
            link("lo", 1, lo, &[0; 6]),
            link(
                "eth0",
                3,
                UP | libc::IFF_BROADCAST as u32,
                &[0x52, 0x54, 0, 0x3a, 0x7c, 0x11],
            ),
            link("v6only", 2, UP, &[2, 0, 0, 0, 0, 1]),
            link("empty", 4, 0, &[2, 0, 0, 0, 0, 2]),
            ip("lo", "127.0.0.1", "255.0.0.0"),
            ip("eth0", "192.0.2.10", "255.255.255.0"),
            ip("lo", "::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ip("v6only", "2001:db8::5", "ffff:ffff:ffff:ffff::"),
            ip("v6only", "fe80::1", "ffff:ffff:ffff:ffff::"),
            ip("eth0", "fe80::5054:ff:fe3a:7c11", "ffff:ffff:ffff:ffff::"),
        ];
        let list = assemble(&entries, |n| (n != "empty").then_some(1500));
        let names: Vec<&str> = list.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["lo", "v6only", "eth0", "empty"]);
        let lo = &list[0];
        assert_eq!(lo.mac, None, "all-zero MAC is no MAC");
        assert_eq!(lo.flags, ["up", "running", "loopback"]);
        assert_eq!(
            lo.addresses,
            [
                IpAddress {
                    address: "127.0.0.1".parse().unwrap(),
                    prefix_len: 8
                },
                IpAddress {
                    address: "::1".parse().unwrap(),
                    prefix_len: 128
                },
            ]
        );
        let v6 = &list[1];
        assert!(v6.addresses.iter().all(|a| a.address.is_ipv6()));
        assert_eq!(v6.addresses.len(), 2);
        assert_eq!(v6.addresses[0].prefix_len, 64);
        let eth0 = &list[2];
        assert_eq!(eth0.mac.as_deref(), Some("52:54:00:3a:7c:11"));
        assert_eq!(eth0.mtu, Some(1500));
        assert_eq!(eth0.flags, ["up", "running", "broadcast"]);
        assert_eq!(eth0.addresses[0].prefix_len, 24);
        let empty = &list[3];
        assert!(empty.addresses.is_empty());
        assert!(empty.flags.is_empty());
        assert_eq!(empty.mtu, None);
    }

    #[test]
    fn prefix_lengths_and_macs() {
        assert_eq!(prefix_len("255.255.255.255".parse().unwrap()), 32);
        assert_eq!(prefix_len("0.0.0.0".parse().unwrap()), 0);
        assert_eq!(prefix_len("255.255.240.0".parse().unwrap()), 20);
        assert_eq!(prefix_len("ffff:ffff:ffff:ff80::".parse().unwrap()), 57);
        assert_eq!(format_mac(&[]), None);
        assert_eq!(format_mac(&[0xAB, 1]).as_deref(), Some("ab:01"));
    }

    #[test]
    fn the_kernel_list_has_the_loopback() {
        let list = interfaces().unwrap();
        let lo = list.iter().find(|i| i.name == "lo").expect("lo");
        assert!(lo.flags.iter().any(|f| f == "loopback"));
        assert!(lo.mtu.is_some());
    }
}
