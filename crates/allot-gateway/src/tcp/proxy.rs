//! The PROXY protocol header (HAProxy's, versions 1 and 2), sent first on a connection to
//! a back end so that the server sees the client's address rather than the gateway's.

use std::net::SocketAddr;

use crate::config::ProxyProtocol;

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `client` to `server` (the address the client
/// connected to: the gateway's listener).
pub(crate) fn header(version: ProxyProtocol, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    // A v4 client of a v6 listener (or the reverse) is written in one family.
    let (client, server) = same_family(client, server);
    match version {
        ProxyProtocol::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                server.ip(),
                client.port(),
                server.port()
            )
            .into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut h = V2_SIGNATURE.to_vec();
            h.push(0x21); // version 2, PROXY
            let mut addrs = Vec::with_capacity(36);
            match (client, server) {
                (SocketAddr::V4(c), SocketAddr::V4(s)) => {
                    h.push(0x11); // AF_INET, STREAM
                    addrs.extend_from_slice(&c.ip().octets());
                    addrs.extend_from_slice(&s.ip().octets());
                }
                (c, s) => {
                    h.push(0x21); // AF_INET6, STREAM
                    addrs.extend_from_slice(&v6(c.ip()).octets());
                    addrs.extend_from_slice(&v6(s.ip()).octets());
                }
            }
            addrs.extend_from_slice(&client.port().to_be_bytes());
            addrs.extend_from_slice(&server.port().to_be_bytes());
            h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
            h.extend_from_slice(&addrs);
            h
        }
    }
}

fn v6(ip: std::net::IpAddr) -> std::net::Ipv6Addr {
    match ip {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
        std::net::IpAddr::V6(a) => a,
    }
}

fn same_family(client: SocketAddr, server: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (c, s) = (canon(client), canon(server));
    if c.is_ipv4() == s.is_ipv4() {
        (c, s)
    } else {
        (
            SocketAddr::new(std::net::IpAddr::V6(v6(c.ip())), c.port()),
            SocketAddr::new(std::net::IpAddr::V6(v6(s.ip())), s.port()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_one_text_line() {
        let h = header(
            ProxyProtocol::V1,
            "192.0.2.7:51000".parse().unwrap(),
            "10.0.0.1:5432".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 5432\r\n");
        let h = header(
            ProxyProtocol::V1,
            "[2001:db8::7]:51000".parse().unwrap(),
            "[::1]:5432".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::7 ::1 51000 5432\r\n");
    }

    #[test]
    fn v2_has_the_signature_family_and_addresses() {
        let h = header(
            ProxyProtocol::V2,
            "192.0.2.7:51000".parse().unwrap(),
            "10.0.0.1:5432".parse().unwrap(),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[192, 0, 2, 7]);
        assert_eq!(&h[20..24], &[10, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 51000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 5432);
        assert_eq!(h.len(), 28);
        // A v4-mapped client of a v6 listener comes out as v4 when both are v4.
        let h = header(
            ProxyProtocol::V2,
            "[::ffff:192.0.2.7]:1".parse().unwrap(),
            "10.0.0.1:2".parse().unwrap(),
        );
        assert_eq!(h[13], 0x11);
    }
}
