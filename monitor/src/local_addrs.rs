//! This host's own addresses: an upstream leg is a flow whose client is
//! one of them (see `monitor_core::detector::upstream`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Listing the interfaces' addresses failed.
#[derive(Debug, thiserror::Error)]
#[error("listing this host's addresses (getifaddrs): {0}")]
pub struct LocalAddrsError(#[from] std::io::Error);

/// Every address of every interface in this network namespace.
pub fn local_addresses() -> Result<Vec<IpAddr>, LocalAddrsError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: getifaddrs gives each node a null address or one of the
        // length its family implies.
        if let Some(a) = unsafe { address(ifa.ifa_addr) } {
            out.push(a);
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The IP address in `sa`, if it holds one.
///
/// # Safety
/// `sa` is null or points to a sockaddr of the length its family implies.
unsafe fn address(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match i32::from((*sa).sa_family) {
        libc::AF_INET => {
            let v4 = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let v6 = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_hosts_addresses_include_loopback() {
        let a = local_addresses().expect("getifaddrs");
        assert!(a.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{a:?}");
    }
}
