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
}
