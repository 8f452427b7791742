//! The answer to a packet that nsx-kube-proxy rejects (a Service port without endpoints, or a
//! port a Service address does not serve), built as kube-proxy's `REJECT` would send it: a TCP
//! RST for TCP, an ICMP port unreachable for UDP, from the address the client tried to reach.
//!
//! Open vSwitch has no action that makes such a packet: the proxy's flows send the packet to the
//! controller, and the node agent's packet-in handler ([`crate::openflow::serve_packet_ins`])
//! sends this answer back out of the port the packet came in on. Without it a real switch drops
//! the packet and the client waits for its timeout instead of failing at once.

const ETH_IPV4: u16 = 0x0800;
const ETH_VLAN: u16 = 0x8100;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// How much of the offending datagram an ICMP error quotes (RFC 1812: as much as fits in 576
/// bytes; Linux quotes the same).
const ICMP_QUOTE_MAX: usize = 576 - 20 - 8;

/// The frame to send back for `frame` (Ethernet, optionally one 802.1Q tag, IPv4), or `None`
/// when nothing is owed: not IPv4 TCP or UDP, a TCP RST (never answered), a fragment after the
/// first, a broadcast or multicast destination, or a frame too short to be what it says.
pub fn reply(frame: &[u8]) -> Option<Vec<u8>> {
    let (l2_len, ethertype) = match be16(frame, 12)? {
        ETH_VLAN => (18, be16(frame, 16)?),
        t => (14, t),
    };
    if ethertype != ETH_IPV4 {
        return None;
    }
    let ip = frame.get(l2_len..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl {
        return None;
    }
    let total = usize::from(be16(ip, 2)?).clamp(ihl, ip.len());
    let ip = &ip[..total];
    let fragment_offset = be16(ip, 6)? & 0x1fff;
    let dst = ip.get(16..20)?;
    if fragment_offset != 0 || dst[0] >= 224 || dst == [255; 4] {
        return None;
    }
    let (src_addr, dst_addr) = (ip.get(12..16)?, dst);
    let l4 = &ip[ihl..];
    let (proto, payload) = match ip[9] {
        PROTO_TCP => (PROTO_TCP, rst(l4, src_addr, dst_addr)?),
        PROTO_UDP => (PROTO_ICMP, port_unreachable(ip)?),
        _ => return None,
    };
    let mut out = Vec::with_capacity(l2_len + 20 + payload.len());
    // Ethernet: back to the sender, from whom it was sent to; the tag as it came.
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..l2_len]);
    let ip_at = out.len();
    let len = u16::try_from(20 + payload.len()).ok()?;
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&len.to_be_bytes());
    // Identification 0, don't fragment, TTL 64.
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    out.extend_from_slice(dst_addr);
    out.extend_from_slice(src_addr);
    let sum = checksum(&[&out[ip_at..ip_at + 20]]);
    out[ip_at + 10..ip_at + 12].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&payload);
    Some(out)
}

/// The RST for a TCP segment (RFC 9293 3.10.7.1: a segment to a closed port), checksummed for
/// a packet from `to` (the address tried) to `from` (the client).
fn rst(seg: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let off = usize::from(seg.get(12)? >> 4) * 4;
    if off < 20 || seg.len() < off {
        return None;
    }
    let flags = seg[13];
    if flags & TCP_RST != 0 {
        return None;
    }
    let (seq, ack) = (be32(seg, 4)?, be32(seg, 8)?);
    let data = (seg.len() - off) as u32;
    let (my_seq, my_ack, my_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let len = data + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&seg[2..4]);
    out.extend_from_slice(&seg[0..2]);
    out.extend_from_slice(&my_seq.to_be_bytes());
    out.extend_from_slice(&my_ack.to_be_bytes());
    out.extend_from_slice(&[0x50, my_flags, 0, 0, 0, 0, 0, 0]);
    let pseudo = pseudo_header(to, from, PROTO_TCP, out.len());
    let sum = checksum(&[&pseudo, &out]);
    out[16..18].copy_from_slice(&sum.to_be_bytes());
    Some(out)
}

/// ICMP destination unreachable, port unreachable, quoting the datagram.
fn port_unreachable(ip: &[u8]) -> Option<Vec<u8>> {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    // The IP header and at least the UDP header must be there to quote.
    if ip.len() < ihl + 8 {
        return None;
    }
    let quote = &ip[..ip.len().min(ICMP_QUOTE_MAX)];
    let mut out = vec![3, 3, 0, 0, 0, 0, 0, 0];
    out.extend_from_slice(quote);
    let sum = checksum(&[&out]);
    out[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(out)
}

fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) of the parts, as if concatenated (each part but the last
/// has an even length here).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_MAC: [u8; 6] = [2, 0x50, 0x56, 0, 0, 0x0a];
    const GW_MAC: [u8; 6] = [2, 0, 0x0a, 4, 0, 1];
    const CLIENT: [u8; 4] = [10, 4, 0, 10];
    const VIP: [u8; 4] = [10, 96, 0, 12];

    fn frame(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&GW_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&ETH_IPV4.to_be_bytes());
        let len = (20 + l4.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 63, proto, 0, 0]);
        f.extend_from_slice(&CLIENT);
        f.extend_from_slice(&VIP);
        let sum = checksum(&[&f[14..34]]);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(l4);
        f
    }

    fn syn() -> Vec<u8> {
        // 40000 -> 7070, seq 1000, SYN, window 64240.
        let mut t = vec![
            0x9c, 0x40, 0x1b, 0x9e, 0, 0, 0x03, 0xe8, 0, 0, 0, 0, 0x50, TCP_SYN,
        ];
        t.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
        t
    }

    /// Checks what a receiving stack checks: the IP header sums to zero, the transport sums to
    /// zero with its pseudo-header, and the addresses and ports are the original's swapped.
    fn assert_valid(r: &[u8], proto: u8) -> (&[u8], &[u8]) {
        assert_eq!(&r[0..6], &CLIENT_MAC);
        assert_eq!(&r[6..12], &GW_MAC);
        let ip = &r[14..];
        assert_eq!(checksum(&[&ip[..20]]), 0, "IP checksum");
        assert_eq!(usize::from(be16(ip, 2).unwrap()), ip.len());
        assert_eq!(
            (ip[9], &ip[12..16], &ip[16..20]),
            (proto, &VIP[..], &CLIENT[..])
        );
        let l4 = &ip[20..];
        let sum = if proto == PROTO_ICMP {
            checksum(&[l4])
        } else {
            checksum(&[&pseudo_header(&VIP, &CLIENT, proto, l4.len()), l4])
        };
        assert_eq!(sum, 0, "transport checksum");
        (ip, l4)
    }

    #[test]
    fn a_syn_gets_a_rst_that_acknowledges_it() {
        let r = reply(&frame(PROTO_TCP, &syn())).expect("a RST");
        let (_, tcp) = assert_valid(&r, PROTO_TCP);
        assert_eq!(be16(tcp, 0), Some(7070));
        assert_eq!(be16(tcp, 2), Some(40000));
        assert_eq!(be32(tcp, 4), Some(0));
        assert_eq!(be32(tcp, 8), Some(1001), "the SYN counts one");
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
    }

    #[test]
    fn a_segment_with_ack_gets_a_rst_at_its_ack_and_a_rst_gets_nothing() {
        let mut t = syn();
        t[13] = TCP_ACK;
        t[8..12].copy_from_slice(&77u32.to_be_bytes());
        let r = reply(&frame(PROTO_TCP, &t)).expect("a RST");
        let (_, tcp) = assert_valid(&r, PROTO_TCP);
        assert_eq!((be32(tcp, 4), tcp[13]), (Some(77), TCP_RST));
        t[13] = TCP_RST | TCP_ACK;
        assert_eq!(reply(&frame(PROTO_TCP, &t)), None);
    }

    #[test]
    fn a_udp_datagram_gets_a_port_unreachable_quoting_it() {
        let udp = [0x9c, 0x40, 0x1b, 0x9e, 0, 12, 0, 0, b'p', b'i', b'n', b'g'];
        let sent = frame(PROTO_UDP, &udp);
        let r = reply(&sent).expect("an ICMP error");
        let (_, icmp) = assert_valid(&r, PROTO_ICMP);
        assert_eq!((icmp[0], icmp[1]), (3, 3));
        assert_eq!(&icmp[8..], &sent[14..], "the datagram, quoted whole");
    }

    #[test]
    fn a_tag_is_kept_and_what_is_owed_nothing_gets_nothing() {
        let plain = frame(PROTO_TCP, &syn());
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x0b]);
        tagged.extend_from_slice(&plain[12..]);
        let r = reply(&tagged).expect("a RST");
        assert_eq!(&r[12..16], &[0x81, 0x00, 0x00, 0x0b]);
        // ICMP, a later fragment, a broadcast, IPv6 and anything cut short: no answer.
        assert_eq!(reply(&frame(PROTO_ICMP, &[8, 0, 0, 0, 0, 0, 0, 0])), None);
        let mut frag = plain.clone();
        frag[20] = 0x00;
        frag[21] = 0x10;
        assert_eq!(reply(&frag), None);
        let mut bcast = plain.clone();
        bcast[30..34].copy_from_slice(&[255; 4]);
        assert_eq!(reply(&bcast), None);
        let mut v6 = plain.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(reply(&v6), None);
        for cut in 0..plain.len() {
            // Any prefix either is answered consistently or not at all, never a panic.
            let _ = reply(&plain[..cut]);
        }
    }
}
