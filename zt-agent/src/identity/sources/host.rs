//! The node's own addresses: whatever prefix they fall in, they are `host`, never a workload's.
//! Read from the kernel at every refresh, so an address added or removed takes effect within
//! one refresh period.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context as _, Result};

/// Every address configured on this network namespace's interfaces (IPv6 link-local ones
/// included: each names this node on its own link).
pub fn node_addresses() -> Result<BTreeSet<IpAddr>> {
    let addresses = nix::ifaddrs::getifaddrs().context("listing the node's addresses")?;
    Ok(addresses
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_node_addresses() {
        let addresses = node_addresses().unwrap();
        assert!(addresses.contains(&IpAddr::from([127, 0, 0, 1])), "{addresses:?}");
    }
}
