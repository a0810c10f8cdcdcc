//! Counting a service's client connections through the kernel's socket diagnostics
//! (`NETLINK_SOCK_DIAG`, what `ss` uses) instead of reading `/proc/net/tcp`.
//!
//! Reading `/proc/net/tcp` walks every bucket of the kernel's TCP hash table, empty or not: on
//! a server with 24 GiB (262,144 buckets) that is ~3.3 ms per file, ~9 ms per probe for IPv4 and
//! IPv6, however few sockets there are, and the drain, restart and verify steps each look
//! several times. A sock_diag dump asks only for the states that hold a client, and answers in
//! a fraction of a millisecond on the same machine (BENCHMARKS.md, B1 on nginx).

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// `SOCK_DIAG_BY_FAMILY` from linux/sock_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// Message types and flags from linux/netlink.h.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the 48-byte sockid.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` up to the end of its sockid's addresses: family, state, timer,
/// retrans, then sport, dport, src[16], dst[16].
const MSG_MIN_LEN: usize = 40;
/// The states that still hold a client (include/net/tcp_states.h): ESTABLISHED (1), SYN_RECV
/// (3) and CLOSE_WAIT (8, the client hung up but the service has not closed yet).
const CLIENT_STATES: u32 = (1 << 1) | (1 << 3) | (1 << 8);
/// A dump's datagrams are at most 32 KiB; twice that leaves none truncated.
const RECV_BUF: usize = 64 * 1024;
/// A dump is answered at once; this only keeps a wedged kernel from hanging the caller.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
/// Any sequence number works: one request per socket, and the socket is the caller's own.
const SEQ: u32 = 0x726f_6c6c;

/// Counts the TCP connections, over IPv4 and IPv6, whose local port is one of `ports` and whose
/// state holds a client, leaving out those whose remote end is in `own`. Blocking: a few
/// syscalls that the kernel answers at once, but run it off the async workers all the same.
pub fn count(ports: &HashSet<u16>, own: &HashSet<SocketAddr>) -> io::Result<u32> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let timeout = TimeVal::new(i64::try_from(RECV_TIMEOUT.as_secs()).unwrap_or(i64::MAX), 0);
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut total = 0u32;
    for family in [
        libc_family(AddressFamily::Inet),
        libc_family(AddressFamily::Inet6),
    ] {
        total = total.saturating_add(dump(&fd, family, ports, own, &mut buf)?);
    }
    Ok(total)
}

fn libc_family(f: AddressFamily) -> u8 {
    u8::try_from(f as i32).unwrap_or(0)
}

/// The request for every TCP socket of `family` in [`CLIENT_STATES`].
pub fn request(family: u8) -> [u8; NLMSG_HDR_LEN + REQ_LEN] {
    let mut req = [0u8; NLMSG_HDR_LEN + REQ_LEN];
    let len = u32::try_from(req.len()).unwrap_or(u32::MAX);
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&SEQ.to_ne_bytes());
    // pid 0: the kernel. Then inet_diag_req_v2.
    req[16] = family;
    req[17] = 6; // IPPROTO_TCP
    req[20..24].copy_from_slice(&CLIENT_STATES.to_ne_bytes());
    req
}

fn dump(
    fd: &OwnedFd,
    family: u8,
    ports: &HashSet<u16>,
    own: &HashSet<SocketAddr>,
    buf: &mut [u8],
) -> io::Result<u32> {
    sendto(
        fd.as_raw_fd(),
        &request(family),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut total = 0u32;
    loop {
        let n = recv(fd.as_raw_fd(), buf, MsgFlags::empty())?;
        let part = parse(buf.get(..n).unwrap_or_default(), ports, own)?;
        total = total.saturating_add(part.count);
        if part.done {
            return Ok(total);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag: the dump ended without NLMSG_DONE",
            ));
        }
    }
}

/// What one datagram of a dump held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Part {
    /// Matching connections in it.
    pub count: u32,
    /// It ended the dump.
    pub done: bool,
}

/// Reads one datagram of netlink messages: counts the matching sockets, notes the end of the
/// dump, and turns a netlink error into an `io::Error`. Messages of another sequence are
/// skipped; a message whose length runs past the datagram is an error.
pub fn parse(dgram: &[u8], ports: &HashSet<u16>, own: &HashSet<SocketAddr>) -> io::Result<Part> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    let mut part = Part::default();
    let mut rest = dgram;
    while rest.len() >= NLMSG_HDR_LEN {
        let len = usize::try_from(u32_at(rest, 0)).unwrap_or(usize::MAX);
        if len < NLMSG_HDR_LEN || len > rest.len() {
            return Err(bad("a message's length runs past its datagram"));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32_at(rest, 8);
        let body = &rest[NLMSG_HDR_LEN..len];
        // Messages are padded to 4 bytes.
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        if seq != SEQ {
            continue;
        }
        match kind {
            NLMSG_DONE => {
                part.done = true;
                return Ok(part);
            }
            NLMSG_ERROR => {
                let errno = if body.len() >= 4 {
                    i32::from_ne_bytes([body[0], body[1], body[2], body[3]])
                } else {
                    0
                };
                if errno == 0 {
                    // An acknowledgement, not an error.
                    continue;
                }
                return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
            }
            SOCK_DIAG_BY_FAMILY => {
                if body.len() < MSG_MIN_LEN {
                    return Err(bad("a socket message is shorter than inet_diag_msg"));
                }
                let local_port = u16::from_be_bytes([body[4], body[5]]);
                if !ports.contains(&local_port) {
                    continue;
                }
                if !own.is_empty() {
                    let remote_port = u16::from_be_bytes([body[6], body[7]]);
                    let remote =
                        addr(body[0], &body[24..40]).map(|ip| SocketAddr::new(ip, remote_port));
                    if remote.is_some_and(|r| own.contains(&r)) {
                        continue;
                    }
                }
                part.count = part.count.saturating_add(1);
            }
            _ => {}
        }
    }
    Ok(part)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_ne_bytes(w)
}

/// An address from a sockid field (network order; IPv4 in the first four bytes). An IPv4
/// client of a dual-stack listener shows as `::ffff:a.b.c.d` and is given back as IPv4, as the
/// agent's own probes remember it.
fn addr(family: u8, field: &[u8]) -> Option<IpAddr> {
    if family == libc_family(AddressFamily::Inet) {
        let b: [u8; 4] = field.get(..4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(b)))
    } else if family == libc_family(AddressFamily::Inet6) {
        let b: [u8; 16] = field.get(..16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(b)).to_canonical())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message of `kind` carrying `body`, with the dump's sequence.
    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDR_LEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    /// An inet_diag_msg for an IPv4 socket from local port `sport` to `remote`.
    fn socket_msg(sport: u16, remote: SocketAddr) -> Vec<u8> {
        let mut b = vec![0u8; 72];
        b[0] = libc_family(AddressFamily::Inet);
        b[1] = 1;
        b[4..6].copy_from_slice(&sport.to_be_bytes());
        b[6..8].copy_from_slice(&remote.port().to_be_bytes());
        b[8..12].copy_from_slice(&[127, 0, 0, 1]);
        if let IpAddr::V4(ip) = remote.ip() {
            b[24..28].copy_from_slice(&ip.octets());
        }
        b
    }

    #[test]
    fn counts_the_services_ports_less_the_agents_own_probes_and_ends_at_done() {
        let ports: HashSet<u16> = [8080].into();
        let own_probe: SocketAddr = "127.0.0.1:50000".parse().expect("an address");
        let client: SocketAddr = "127.0.0.1:50002".parse().expect("an address");
        let mut d = Vec::new();
        d.extend(message(SOCK_DIAG_BY_FAMILY, SEQ, &socket_msg(8080, client)));
        d.extend(message(
            SOCK_DIAG_BY_FAMILY,
            SEQ,
            &socket_msg(8080, own_probe),
        ));
        d.extend(message(SOCK_DIAG_BY_FAMILY, SEQ, &socket_msg(9090, client)));
        // Another request's answer is not ours.
        d.extend(message(
            SOCK_DIAG_BY_FAMILY,
            SEQ + 1,
            &socket_msg(8080, client),
        ));
        let own = [own_probe].into();
        assert_eq!(
            parse(&d, &ports, &own).expect("parses"),
            Part {
                count: 1,
                done: false
            }
        );
        assert_eq!(parse(&d, &ports, &HashSet::new()).expect("parses").count, 2);
        d.extend(message(NLMSG_DONE, SEQ, &[0; 4]));
        assert_eq!(
            parse(&d, &ports, &own).expect("parses"),
            Part {
                count: 1,
                done: true
            }
        );
    }

    #[test]
    fn a_netlink_error_and_a_short_or_overlong_message_are_errors() {
        let ports: HashSet<u16> = [8080].into();
        let none = HashSet::new();
        let eperm = message(NLMSG_ERROR, SEQ, &(-1i32).to_ne_bytes());
        let e = parse(&eperm, &ports, &none).expect_err("EPERM");
        assert_eq!(e.raw_os_error(), Some(1));
        let ack = message(NLMSG_ERROR, SEQ, &0i32.to_ne_bytes());
        assert_eq!(parse(&ack, &ports, &none).expect("an ack"), Part::default());
        let short = message(SOCK_DIAG_BY_FAMILY, SEQ, &[0; 8]);
        assert!(parse(&short, &ports, &none).is_err());
        let mut overlong = message(
            SOCK_DIAG_BY_FAMILY,
            SEQ,
            &socket_msg(8080, "127.0.0.1:1".parse().expect("an address")),
        );
        overlong[0..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(parse(&overlong, &ports, &none).is_err());
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_its_ipv4_address() {
        let mapped: Ipv6Addr = "::ffff:127.0.0.1".parse().expect("an address");
        assert_eq!(
            addr(libc_family(AddressFamily::Inet6), &mapped.octets()),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(addr(0, &[0; 16]), None);
    }

    /// The kernel's own answer, on real sockets, agrees with `/proc/net/tcp`.
    #[test]
    fn counts_real_connections_over_ipv4_and_ipv6() -> io::Result<()> {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0")?;
        let ports: HashSet<u16> = [v4.local_addr()?.port()].into();
        assert_eq!(count(&ports, &HashSet::new())?, 0);
        let c1 = std::net::TcpStream::connect(v4.local_addr()?)?;
        // Not accepted yet: the connection waits in the accept queue and is counted.
        assert_eq!(count(&ports, &HashSet::new())?, 1);
        let (s1, _) = v4.accept()?;
        assert_eq!(count(&ports, &HashSet::new())?, 1);
        // Its remote end is left out when it is one of the agent's own.
        assert_eq!(count(&ports, &[c1.local_addr()?].into())?, 0);
        let text = std::fs::read_to_string("/proc/net/tcp")?;
        assert_eq!(
            crate::probe::count_active(&text, &ports, &HashSet::new()),
            1
        );
        drop((c1, s1));
        if let Ok(v6) = std::net::TcpListener::bind("[::1]:0") {
            let ports6: HashSet<u16> = [v6.local_addr()?.port()].into();
            let c = std::net::TcpStream::connect(v6.local_addr()?)?;
            assert_eq!(count(&ports6, &HashSet::new())?, 1);
            assert_eq!(count(&ports6, &[c.local_addr()?].into())?, 0);
        }
        Ok(())
    }
}
