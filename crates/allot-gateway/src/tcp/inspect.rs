//! What a connection's client sends first, read before connecting upstream so it can be
//! classified by it: its first bytes, and the server name of a TLS ClientHello (SNI),
//! read without terminating TLS. The bytes read are forwarded to the server unchanged.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Reads what the client sends first, for at most `wait` and at most `max_bytes`: the
/// first segment, or a whole TLS handshake record if it starts one. Nothing (an empty
/// buffer) when the client sends nothing in time, as server-speaks-first protocols do.
/// Also empty when the client closed or the read failed.
pub(crate) async fn first_bytes(
    stream: &mut TcpStream,
    wait: Duration,
    max_bytes: usize,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(max_bytes.min(16 * 1024 + 5));
    let deadline = tokio::time::Instant::now() + wait;
    let mut chunk = vec![0u8; max_bytes.min(16 * 1024 + 5)];
    while buf.len() < max_bytes {
        let room = (max_bytes - buf.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        // One segment is enough, unless it is the start of a TLS record still coming.
        match tls_record_len(&buf) {
            Some(len) if buf.len() < len => continue,
            _ => break,
        }
    }
    buf
}

/// If `buf` starts a TLS handshake record, its whole length (header included).
fn tls_record_len(buf: &[u8]) -> Option<usize> {
    if buf.first() != Some(&0x16) || buf.len() < 5 {
        return (buf.first() == Some(&0x16)).then_some(5);
    }
    Some(5 + usize::from(u16::from_be_bytes([buf[3], buf[4]])))
}

/// The server name (SNI, RFC 6066 §3) of the TLS ClientHello at the start of `buf`, if
/// it is one and names a host. Reads only what is there; never fails loudly.
pub(crate) fn server_name(buf: &[u8]) -> Option<&str> {
    let mut r = Reader(buf);
    // TLS record: handshake (22), version, length.
    if r.u8()? != 0x16 {
        return None;
    }
    r.skip(2)?;
    let record_len = usize::from(r.u16()?);
    let record = match r.take(record_len) {
        Some(rec) => rec,
        None => r.rest(),
    };
    let mut h = Reader(record);
    // Handshake: client_hello (1), 24-bit length.
    if h.u8()? != 0x01 {
        return None;
    }
    let len = h.u24()?;
    let body = match h.take(len) {
        Some(b) => b,
        None => h.rest(),
    };
    let mut hello = Reader(body);
    hello.skip(2 + 32)?; // version, random
    let session = usize::from(hello.u8()?);
    hello.skip(session)?;
    let suites = usize::from(hello.u16()?);
    hello.skip(suites)?;
    let compression = usize::from(hello.u8()?);
    hello.skip(compression)?;
    let ext_len = usize::from(hello.u16()?);
    let mut exts = Reader(hello.take(ext_len)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = usize::from(exts.u16()?);
        let body = exts.take(len)?;
        if kind != 0 {
            continue;
        }
        // server_name extension: a list of (type, name); type 0 is a host name.
        let mut list = Reader(body);
        let len = usize::from(list.u16()?);
        let mut names = Reader(list.take(len)?);
        while !names.0.is_empty() {
            let kind = names.u8()?;
            let len = usize::from(names.u16()?);
            let name = names.take(len)?;
            if kind == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return (!name.is_empty()).then_some(name);
            }
        }
        return None;
    }
    None
}

/// A cursor over bytes that answers `None` past the end instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello naming `host`.
    fn client_hello(host: &str) -> Vec<u8> {
        let name = host.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut exts = Vec::new();
        // An unrelated extension first (supported_groups), then server_name.
        exts.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
        exts.extend_from_slice(&[0x00, 0x00]);
        exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni);
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[7; 32]);
        hello.push(0); // session id
        hello.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        hello.extend_from_slice(&[0x01, 0x00]); // null compression
        hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        hello.extend_from_slice(&exts);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&hello);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_server_name_is_read_from_a_client_hello() {
        let hello = client_hello("db.example.com");
        assert_eq!(server_name(&hello), Some("db.example.com"));
        assert_eq!(tls_record_len(&hello), Some(hello.len()));
        // Cut short: no name, no panic.
        for n in 0..hello.len() - 1 {
            let _ = server_name(&hello[..n]);
        }
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(server_name(b""), None);
    }

    proptest::proptest! {
        #[test]
        fn no_input_makes_the_reader_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = server_name(&bytes);
            let mut with_tls = vec![0x16, 0x03, 0x01];
            with_tls.extend_from_slice(&bytes);
            let _ = server_name(&with_tls);
        }
    }
}
