//! GATT identifiers of the lock service and the serial-derived advertising UUID (spec §1).

pub const SERVICE_UUID: &str = "00000002-4899-489f-a301-fbee544b1db0";
pub const NOTIFICATIONS_UUID: &str = "00000101-4899-489f-a301-fbee544b1db0";
pub const PTLS_TX_UUID: &str = "00000301-4899-489f-a301-fbee544b1db0";
pub const PTLS_RX_UUID: &str = "00000401-4899-489f-a301-fbee544b1db0";
pub const API_COMMANDS_UUID: &str = "00000501-4899-489f-a301-fbee544b1db0";

/// A lock serial is 14 digits, written `12345678-901234`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lock serial {0:?} is not 14 digits in the form 12345678-901234")]
pub struct BadSerial(pub String);

/// The 14 digits of a serial, in order, with the dash and anything else rejected.
pub fn serial_digits(serial: &str) -> Result<[u8; 14], BadSerial> {
    let bad = || BadSerial(serial.to_string());
    let (a, b) = serial.split_once('-').ok_or_else(bad)?;
    if a.len() != 8 || b.len() != 6 {
        return Err(bad());
    }
    let mut out = [0u8; 14];
    for (slot, c) in out.iter_mut().zip(a.chars().chain(b.chars())) {
        *slot = c.to_digit(10).ok_or_else(bad)? as u8;
    }
    Ok(out)
}

/// The 128-bit advertising UUID built from the serial: the digits fill the positions
/// `xxxx0000-xxxx-xxxx-xx00-000000000000` in order.
pub fn serial_uuid(serial: &str) -> Result<String, BadSerial> {
    let d = serial_digits(serial)?;
    let s: String = d.iter().map(|x| char::from(b'0' + x)).collect();
    Ok(format!(
        "{}0000-{}-{}-{}00-000000000000",
        &s[0..4],
        &s[4..8],
        &s[8..12],
        &s[12..14]
    ))
}

/// The serial a lock's advertised UUID was built from ([`serial_uuid`] backwards); `None` for
/// any UUID not of that form.
pub fn serial_from_uuid(uuid: &str) -> Option<String> {
    let u = uuid.to_ascii_lowercase();
    let b = u.as_bytes();
    if b.len() != 36 || &u[4..8] != "0000" || &u[21..36] != "00-000000000000" {
        return None;
    }
    if [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let digits: String = [&u[0..4], &u[9..13], &u[14..18], &u[19..21]].concat();
    if digits.len() != 14 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(format!("{}-{}", &digits[0..8], &digits[8..14]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_uuid_matches_spec_example() {
        assert_eq!(
            serial_uuid("12345678-901234").unwrap(),
            "12340000-5678-9012-3400-000000000000"
        );
        assert!(serial_uuid("1234567-8901234").is_err());
        assert!(serial_uuid("1234567a-901234").is_err());
    }

    #[test]
    fn a_serial_is_read_back_from_its_uuid_and_nothing_else_is() {
        let uuid = serial_uuid("12345678-901234").unwrap();
        assert_eq!(serial_from_uuid(&uuid).as_deref(), Some("12345678-901234"));
        assert_eq!(
            serial_from_uuid(&uuid.to_uppercase()).as_deref(),
            Some("12345678-901234")
        );
        for other in [
            SERVICE_UUID,
            "12340000-5678-9012-3401-000000000000",
            "1234a000-5678-9012-3400-000000000000",
            "12340000-5678-9012-34",
            "12340000+5678-9012-3400-000000000000",
            "",
        ] {
            assert_eq!(serial_from_uuid(other), None, "{other}");
        }
    }
}
