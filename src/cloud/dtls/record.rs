//! DTLS 1.2 records and handshake fragments as checked views over untrusted datagrams
//! (RFC 6347 §4.1 and §4.2.2). Nothing here allocates per byte or panics on short input: a
//! record or fragment that does not fit ends the iteration.

pub const CT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CT_ALERT: u8 = 21;
pub const CT_HANDSHAKE: u8 = 22;
pub const CT_APPLICATION_DATA: u8 = 23;

pub const HS_CLIENT_HELLO: u8 = 1;
pub const HS_SERVER_HELLO: u8 = 2;
pub const HS_HELLO_VERIFY_REQUEST: u8 = 3;
pub const HS_FINISHED: u8 = 20;

pub const RECORD_HEADER: usize = 13;
pub const HANDSHAKE_HEADER: usize = 12;

/// One record of a datagram.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    pub content_type: u8,
    pub epoch: u16,
    /// The 13-byte header (type, version, epoch, sequence number, length).
    pub header: &'a [u8],
    pub fragment: &'a [u8],
    /// Header and fragment.
    pub raw: &'a [u8],
}

/// The records of a datagram, in order; a truncated last record is not yielded.
pub fn records(datagram: &[u8]) -> Records<'_> {
    Records { rest: datagram }
}

pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        let header = self.rest.get(..RECORD_HEADER)?;
        let len = u16::from_be_bytes([header[11], header[12]]) as usize;
        let Some(fragment) = self.rest.get(RECORD_HEADER..RECORD_HEADER + len) else {
            self.rest = &[];
            return None;
        };
        let raw = &self.rest[..RECORD_HEADER + len];
        self.rest = &self.rest[RECORD_HEADER + len..];
        Some(Record {
            content_type: header[0],
            epoch: u16::from_be_bytes([header[3], header[4]]),
            header,
            fragment,
            raw,
        })
    }
}

/// One handshake message fragment of a handshake record.
#[derive(Clone, Copy, Debug)]
pub struct Fragment<'a> {
    pub msg_type: u8,
    /// The whole message's length.
    pub length: u32,
    pub message_seq: u16,
    pub offset: u32,
    pub body: &'a [u8],
}

/// The handshake fragments of a handshake record's plaintext.
pub fn fragments(fragment: &[u8]) -> Fragments<'_> {
    Fragments { rest: fragment }
}

pub struct Fragments<'a> {
    rest: &'a [u8],
}

fn u24(b: &[u8]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

impl<'a> Iterator for Fragments<'a> {
    type Item = Fragment<'a>;

    fn next(&mut self) -> Option<Fragment<'a>> {
        let h = self.rest.get(..HANDSHAKE_HEADER)?;
        let len = u24(&h[9..12]) as usize;
        let Some(body) = self.rest.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + len) else {
            self.rest = &[];
            return None;
        };
        self.rest = &self.rest[HANDSHAKE_HEADER + len..];
        Some(Fragment {
            msg_type: h[0],
            length: u24(&h[1..4]),
            message_seq: u16::from_be_bytes([h[4], h[5]]),
            offset: u24(&h[6..9]),
            body,
        })
    }
}

/// What the demultiplexer reads from a datagram whose first record is an epoch-0 ClientHello.
#[derive(Debug, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Empty in a first ClientHello, which anybody can send from any address.
    pub cookie: &'a [u8],
    /// The offered cipher suites (empty when the ClientHello is fragmented).
    pub suites: Vec<u16>,
}

/// The datagram's first record is a ClientHello in epoch 0.
pub fn client_hello(datagram: &[u8]) -> Option<Hello<'_>> {
    let r = records(datagram).next()?;
    if r.content_type != CT_HANDSHAKE || r.epoch != 0 {
        return None;
    }
    let f = fragments(r.fragment).next()?;
    if f.msg_type != HS_CLIENT_HELLO {
        return None;
    }
    let whole = f.offset == 0 && f.body.len() as u32 == f.length;
    let body = f.body;
    // client_version(2), random(32), session_id, cookie, cipher_suites
    let mut at = 2 + 32;
    let session_id = *body.get(at)? as usize;
    at += 1 + session_id;
    let cookie_len = *body.get(at)? as usize;
    let cookie = body.get(at + 1..at + 1 + cookie_len)?;
    at += 1 + cookie_len;
    let suites = (|| {
        let len = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
        let list = body.get(at + 2..at + 2 + len)?;
        Some(
            list.chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect(),
        )
    })()
    .filter(|_| whole)
    .unwrap_or_default();
    Some(Hello { cookie, suites })
}

/// The cookie of a HelloVerifyRequest among the datagram's records.
pub fn hello_verify_cookie(datagram: &[u8]) -> Option<&[u8]> {
    records(datagram)
        .filter(|r| r.content_type == CT_HANDSHAKE && r.epoch == 0)
        .flat_map(|r| fragments(r.fragment))
        .find(|f| f.msg_type == HS_HELLO_VERIFY_REQUEST)
        .and_then(|f| {
            // server_version(2), cookie<0..2^8-1>
            let len = *f.body.get(2)? as usize;
            f.body.get(3..3 + len)
        })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn record(content_type: u8, epoch: u16, seq: u64, fragment: &[u8]) -> Vec<u8> {
        let mut r = vec![content_type, 0xFE, 0xFD];
        r.extend_from_slice(&epoch.to_be_bytes());
        r.extend_from_slice(&seq.to_be_bytes()[2..]);
        r.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
        r.extend_from_slice(fragment);
        r
    }

    pub fn handshake(msg_type: u8, msg_seq: u16, offset: u32, length: u32, body: &[u8]) -> Vec<u8> {
        let mut h = vec![msg_type];
        h.extend_from_slice(&length.to_be_bytes()[1..]);
        h.extend_from_slice(&msg_seq.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes()[1..]);
        h.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        h.extend_from_slice(body);
        h
    }

    /// A ClientHello record with `cookie`, offering `suites`.
    pub fn hello(cookie: &[u8], suites: &[u16]) -> Vec<u8> {
        let mut body = vec![0xFE, 0xFD];
        body.extend_from_slice(&[9; 32]);
        body.push(0);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
        for s in suites {
            body.extend_from_slice(&s.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]);
        let len = body.len() as u32;
        record(
            CT_HANDSHAKE,
            0,
            0,
            &handshake(HS_CLIENT_HELLO, 0, 0, len, &body),
        )
    }

    #[test]
    fn records_and_fragments_are_read_without_trusting_lengths() {
        let mut d = record(CT_HANDSHAKE, 0, 5, &handshake(1, 2, 0, 3, &[1, 2, 3]));
        d.extend(record(CT_APPLICATION_DATA, 1, 6, &[9; 20]));
        let rs: Vec<Record> = records(&d).collect();
        assert_eq!(rs.len(), 2);
        assert_eq!((rs[0].content_type, rs[0].epoch), (CT_HANDSHAKE, 0));
        assert_eq!(
            (rs[1].content_type, rs[1].epoch, rs[1].fragment.len()),
            (23, 1, 20)
        );
        let f: Vec<Fragment> = fragments(rs[0].fragment).collect();
        assert_eq!(
            (f[0].msg_type, f[0].message_seq, f[0].body),
            (1, 2, &[1u8, 2, 3][..])
        );
        for cut in 0..d.len() {
            let n = records(&d[..cut]).count();
            assert!(n <= 2);
            for r in records(&d[..cut]) {
                let _ = fragments(r.fragment).count();
            }
        }
    }

    #[test]
    fn suites_and_cookie_are_read_from_a_client_hello() {
        let first = hello(&[], &[0xC02B, 0x00A8]);
        let h = client_hello(&first).unwrap();
        assert_eq!((h.cookie, h.suites), (&[][..], vec![0xC02B, 0x00A8]));
        let second = hello(&[1; 20], &[0xC0AE]);
        let h = client_hello(&second).unwrap();
        assert_eq!((h.cookie, h.suites), (&[1u8; 20][..], vec![0xC0AE]));
        for cut in 0..first.len() {
            let _ = client_hello(&first[..cut]);
        }
        let mut epoch1 = first.clone();
        epoch1[4] = 1;
        assert!(client_hello(&epoch1).is_none());
        let mut fragment = first.clone();
        fragment[RECORD_HEADER + 8] = 1; // fragment_offset != 0
        assert!(client_hello(&fragment).is_none_or(|h| h.suites.is_empty()));
        assert!(client_hello(&record(CT_APPLICATION_DATA, 0, 0, &[1; 40])).is_none());
    }

    #[test]
    fn the_cookie_of_a_hello_verify_request() {
        let body = [0xFE, 0xFF, 3, 7, 8, 9];
        let hvr = record(
            CT_HANDSHAKE,
            0,
            0,
            &handshake(HS_HELLO_VERIFY_REQUEST, 0, 0, 6, &body),
        );
        assert_eq!(hello_verify_cookie(&hvr), Some(&[7u8, 8, 9][..]));
        assert_eq!(hello_verify_cookie(&hvr[..hvr.len() - 1]), None);
        assert_eq!(hello_verify_cookie(&hello(&[], &[1])), None);
    }
}
