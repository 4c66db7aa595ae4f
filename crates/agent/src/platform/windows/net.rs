//! Network adapters from GetAdaptersAddresses (names, MAC, MTU, addresses)
//! and GetIfEntry2 (administrative state, counters).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kvm_agent_protocol::methods::info::{Interface, IpAddress};
use windows_sys::Win32::Foundation::{ERROR_BUFFER_OVERFLOW, ERROR_SUCCESS};
use windows_sys::Win32::NetworkManagement::IpHelper::{
    GetAdaptersAddresses, GetIfEntry2, GAA_FLAG_SKIP_ANYCAST, GAA_FLAG_SKIP_DNS_SERVER,
    GAA_FLAG_SKIP_MULTICAST, IF_TYPE_ETHERNET_CSMACD, IF_TYPE_IEEE80211, IF_TYPE_SOFTWARE_LOOPBACK,
    IP_ADAPTER_ADDRESSES_LH, IP_ADAPTER_NO_MULTICAST, MIB_IF_ROW2,
};
use windows_sys::Win32::NetworkManagement::Ndis::{
    IfOperStatusUp, NET_IF_ADMIN_STATUS_UP, NET_LUID_LH,
};
use windows_sys::Win32::Networking::WinSock::{
    AF_INET, AF_INET6, AF_UNSPEC, SOCKADDR, SOCKADDR_IN, SOCKADDR_IN6, SOCKET_ADDRESS,
};

use super::wide::from_wide_ptr;
use super::{win32_error, PlatformError};
use crate::platform::NetCounters;

/// What GetAdaptersAddresses says about one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adapter {
    /// IPv4 interface index, else the IPv6 one.
    pub index: u32,
    /// The interface's LUID, to look up its MIB_IF_ROW2.
    pub luid: u64,
    /// Friendly name ("Ethernet").
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub if_type: u32,
    pub oper_up: bool,
    pub multicast: bool,
    pub addresses: Vec<IpAddress>,
}

/// The address in a SOCKET_ADDRESS, if IPv4 or IPv6.
///
/// # Safety
/// `sa.lpSockaddr` is null or points to `sa.iSockaddrLength` readable bytes.
unsafe fn socket_address(sa: &SOCKET_ADDRESS) -> Option<IpAddr> {
    let len = usize::try_from(sa.iSockaddrLength).ok()?;
    if sa.lpSockaddr.is_null() || len < std::mem::size_of::<SOCKADDR>() {
        return None;
    }
    // SAFETY: at least a SOCKADDR's bytes are readable (checked above); the
    // reads are unaligned-safe.
    let family = unsafe { std::ptr::read_unaligned(sa.lpSockaddr) }.sa_family;
    match family {
        AF_INET if len >= std::mem::size_of::<SOCKADDR_IN>() => {
            // SAFETY: the family and length say this is a SOCKADDR_IN.
            let sin = unsafe { std::ptr::read_unaligned(sa.lpSockaddr.cast::<SOCKADDR_IN>()) };
            // SAFETY: every view of IN_ADDR is the same four bytes.
            let octets = unsafe { sin.sin_addr.S_un.S_un_b };
            Some(IpAddr::V4(Ipv4Addr::new(
                octets.s_b1,
                octets.s_b2,
                octets.s_b3,
                octets.s_b4,
            )))
        }
        AF_INET6 if len >= std::mem::size_of::<SOCKADDR_IN6>() => {
            // SAFETY: the family and length say this is a SOCKADDR_IN6.
            let sin6 = unsafe { std::ptr::read_unaligned(sa.lpSockaddr.cast::<SOCKADDR_IN6>()) };
            // SAFETY: every view of IN6_ADDR is the same sixteen bytes.
            let bytes = unsafe { sin6.sin6_addr.u.Byte };
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Every adapter with its unicast addresses, in interface index order.
pub fn adapters() -> Result<Vec<Adapter>, PlatformError> {
    const CALL: &str = "GetAdaptersAddresses";
    let flags = GAA_FLAG_SKIP_ANYCAST | GAA_FLAG_SKIP_MULTICAST | GAA_FLAG_SKIP_DNS_SERVER;
    let mut size = 0u32;
    // SAFETY: a null buffer with size 0 asks for the size.
    let mut rc = unsafe {
        GetAdaptersAddresses(
            u32::from(AF_UNSPEC),
            flags,
            std::ptr::null(),
            std::ptr::null_mut(),
            &mut size,
        )
    };
    // u64 elements: the buffer is aligned for the structures written in it.
    let mut buf: Vec<u64> = Vec::new();
    // Adapters may come and go between the calls: ask again, a few times.
    for _ in 0..4 {
        match rc {
            ERROR_BUFFER_OVERFLOW => {
                buf = vec![0u64; (size as usize).div_ceil(8)];
                size = (buf.len() * 8) as u32;
                // SAFETY: `buf` holds `size` writable, aligned bytes.
                rc = unsafe {
                    GetAdaptersAddresses(
                        u32::from(AF_UNSPEC),
                        flags,
                        std::ptr::null(),
                        buf.as_mut_ptr().cast(),
                        &mut size,
                    )
                };
            }
            _ => break,
        }
    }
    match rc {
        ERROR_SUCCESS if !buf.is_empty() => {}
        // ERROR_NO_DATA: no adapter at all; success on an empty buffer too.
        232 | ERROR_SUCCESS => return Ok(Vec::new()),
        other => return Err(win32_error(CALL, other)),
    }
    let mut list = Vec::new();
    let mut p = buf.as_ptr().cast::<IP_ADAPTER_ADDRESSES_LH>();
    while !p.is_null() {
        // SAFETY: `p` is the head or a `Next` of the list the call wrote
        // into `buf`, which is alive and unchanged.
        let a = unsafe { &*p };
        // SAFETY: both union views are plain integers.
        let if_index = unsafe { a.Anonymous1.Anonymous.IfIndex };
        // SAFETY: as above.
        let adapter_flags = unsafe { a.Anonymous2.Flags };
        // SAFETY: as above.
        let luid = unsafe { a.Luid.Value };
        let mut addresses = Vec::new();
        let mut u = a.FirstUnicastAddress;
        while !u.is_null() {
            // SAFETY: a node of the unicast list inside `buf`.
            let ua = unsafe { &*u };
            // SAFETY: the socket address the call wrote, with its length.
            if let Some(address) = unsafe { socket_address(&ua.Address) } {
                addresses.push(IpAddress {
                    address,
                    prefix_len: ua.OnLinkPrefixLength,
                });
            }
            u = ua.Next;
        }
        let mac_len = (a.PhysicalAddressLength as usize).min(a.PhysicalAddress.len());
        list.push(Adapter {
            index: if if_index != 0 {
                if_index
            } else {
                a.Ipv6IfIndex
            },
            luid,
            // SAFETY: FriendlyName is null or a NUL-terminated string in `buf`.
            name: unsafe { from_wide_ptr(a.FriendlyName) }.unwrap_or_default(),
            mac: a.PhysicalAddress[..mac_len].to_vec(),
            mtu: a.Mtu,
            if_type: a.IfType,
            oper_up: a.OperStatus == IfOperStatusUp,
            multicast: adapter_flags & IP_ADAPTER_NO_MULTICAST == 0,
            addresses,
        });
        p = a.Next;
    }
    list.sort_by_key(|a| a.index);
    Ok(list)
}

/// The interface's MIB_IF_ROW2 (state and counters); None if it is gone.
fn if_row(luid: u64) -> Option<Box<MIB_IF_ROW2>> {
    let mut row: Box<MIB_IF_ROW2> = Box::default();
    row.InterfaceLuid = NET_LUID_LH { Value: luid };
    // SAFETY: a valid row whose LUID says which interface to read.
    let rc = unsafe { GetIfEntry2(&mut *row) };
    if rc == ERROR_SUCCESS {
        Some(row)
    } else {
        log::debug!("GetIfEntry2({luid:#x}): error {rc}");
        None
    }
}

/// `aa:bb:...` in lower case; None for an empty or all-zero address.
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

/// The protocol's flags, in its order: `up` (administratively enabled;
/// unknown without `admin_up`, so left out), `running` (operational),
/// `loopback`, `broadcast` (Ethernet and Wi-Fi links), `multicast`.
pub fn flags(a: &Adapter, admin_up: Option<bool>) -> Vec<String> {
    let loopback = a.if_type == IF_TYPE_SOFTWARE_LOOPBACK;
    let broadcast = a.if_type == IF_TYPE_ETHERNET_CSMACD || a.if_type == IF_TYPE_IEEE80211;
    [
        (admin_up == Some(true) || a.oper_up, "up"),
        (a.oper_up, "running"),
        (loopback, "loopback"),
        (broadcast, "broadcast"),
        (a.multicast, "multicast"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_owned())
    .collect()
}

/// The interface as the protocol shows it. The loopback's MTU is reported
/// as 0xFFFFFFFF ("none"): null.
pub fn to_interface(a: Adapter, admin_up: Option<bool>) -> Interface {
    Interface {
        flags: flags(&a, admin_up),
        mac: format_mac(&a.mac),
        mtu: (a.mtu != u32::MAX).then_some(a.mtu),
        name: a.name,
        addresses: a.addresses,
    }
}

/// Every adapter, in interface index order, unfiltered.
pub fn interfaces() -> Result<Vec<Interface>, PlatformError> {
    Ok(adapters()?
        .into_iter()
        .map(|a| {
            let admin_up = if_row(a.luid).map(|r| r.AdminStatus == NET_IF_ADMIN_STATUS_UP);
            to_interface(a, admin_up)
        })
        .collect())
}

/// Counters of the adapters `interfaces` lists (by the same names); an
/// adapter whose row cannot be read is left out.
pub fn net_counters() -> Result<Vec<NetCounters>, PlatformError> {
    Ok(adapters()?
        .into_iter()
        .filter_map(|a| {
            let r = if_row(a.luid)?;
            Some(NetCounters {
                name: a.name,
                rx_bytes: r.InOctets,
                rx_packets: r.InUcastPkts.saturating_add(r.InNUcastPkts),
                rx_errors: r.InErrors,
                rx_dropped: r.InDiscards,
                tx_bytes: r.OutOctets,
                tx_packets: r.OutUcastPkts.saturating_add(r.OutNUcastPkts),
                tx_errors: r.OutErrors,
                tx_dropped: r.OutDiscards,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(if_type: u32, oper_up: bool) -> Adapter {
        Adapter {
            index: 1,
            luid: 0,
            name: "Ethernet".into(),
            mac: vec![0x52, 0x54, 0, 0x9e, 4, 0xd2],
            mtu: 1500,
            if_type,
            oper_up,
            multicast: true,
            addresses: Vec::new(),
        }
    }

    #[test]
    fn flag_names() {
        let eth = adapter(IF_TYPE_ETHERNET_CSMACD, true);
        assert_eq!(
            flags(&eth, Some(true)),
            ["up", "running", "broadcast", "multicast"]
        );
        let down = adapter(IF_TYPE_ETHERNET_CSMACD, false);
        assert_eq!(flags(&down, Some(true)), ["up", "broadcast", "multicast"]);
        assert_eq!(flags(&down, Some(false)), ["broadcast", "multicast"]);
        assert_eq!(flags(&down, None), ["broadcast", "multicast"]);
        let mut lo = adapter(IF_TYPE_SOFTWARE_LOOPBACK, true);
        lo.multicast = false;
        lo.mac.clear();
        lo.mtu = u32::MAX;
        let i = to_interface(lo, None);
        assert_eq!(i.flags, ["up", "running", "loopback"]);
        assert_eq!(i.mac, None);
        assert_eq!(i.mtu, None);
        let e = to_interface(eth, Some(true));
        assert_eq!(e.mac.as_deref(), Some("52:54:00:9e:04:d2"));
        assert_eq!(e.mtu, Some(1500));
    }

    #[test]
    fn live_interfaces() {
        let list = interfaces().unwrap();
        let raw = adapters().unwrap();
        assert_eq!(list.len(), raw.len());
        let indexes: Vec<u32> = raw.iter().map(|a| a.index).collect();
        let mut sorted = indexes.clone();
        sorted.sort_unstable();
        assert_eq!(indexes, sorted);
        for i in &list {
            assert!(!i.name.is_empty(), "{i:?}");
            for a in &i.addresses {
                let max = if a.address.is_ipv4() { 32 } else { 128 };
                assert!(a.prefix_len <= max, "{i:?}");
            }
            if let Some(mac) = &i.mac {
                assert_eq!(mac.len() % 3, 2, "{mac}");
            }
        }
        // Wine lists its loopback; a real Windows guest does too.
        let lo = list
            .iter()
            .find(|i| i.flags.iter().any(|f| f == "loopback"))
            .unwrap_or_else(|| panic!("no loopback in {list:?}"));
        assert!(
            lo.addresses
                .iter()
                .any(|a| a.address == IpAddr::V4(Ipv4Addr::LOCALHOST) && a.prefix_len == 8),
            "{lo:?}"
        );
        let counters = net_counters().unwrap();
        for c in &counters {
            assert!(list.iter().any(|i| i.name == c.name), "{c:?}");
        }
    }
}
