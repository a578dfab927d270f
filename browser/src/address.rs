//! The text forms of the JavaScript API: a device address is its identity
//! key in lowercase hex, a colon, and its device number in decimal
//! (`3b6a…e1:1`); ids are lowercase hex. Pure functions, tested natively.

use cubbyhole::transport::DeviceAddress;

/// Why a text is not an address or an id.
pub const BAD_ADDRESS: &str =
    "an address is 64 hex digits, ':', and a device number (1 to 4294967295)";

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// `N` bytes from exactly `2 * N` hex digits (either case).
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (value(digits[2 * i])? << 4) | value(digits[2 * i + 1])?;
    }
    Some(out)
}

/// The address's text form.
pub fn format_address(address: &DeviceAddress) -> String {
    format!("{}:{}", hex(&address.identity), address.device_id)
}

/// Parses [`format_address`]'s form (surrounding whitespace allowed). The
/// identity bytes are not checked to be a valid key here: whatever uses
/// the address does that.
pub fn parse_address(text: &str) -> Result<DeviceAddress, &'static str> {
    let (identity, device) = text.trim().split_once(':').ok_or(BAD_ADDRESS)?;
    let identity = unhex::<32>(identity).ok_or(BAD_ADDRESS)?;
    if device.is_empty() || device.len() > 10 || !device.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD_ADDRESS);
    }
    let device_id = device.parse::<u32>().map_err(|_| BAD_ADDRESS)?;
    if device_id == 0 {
        return Err(BAD_ADDRESS);
    }
    Ok(DeviceAddress {
        identity,
        device_id,
    })
}

/// Digits in groups of five, separated by spaces (how a safety number is
/// shown).
pub fn group_digits(digits: &str) -> String {
    let mut out = String::with_capacity(digits.len() + digits.len() / 5);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && i % 5 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        let a = DeviceAddress {
            identity: [0xab; 32],
            device_id: 7,
        };
        let text = format_address(&a);
        assert_eq!(text, format!("{}:7", "ab".repeat(32)));
        assert_eq!(parse_address(&text), Ok(a));
        assert_eq!(parse_address(&format!("  {}:7\n", "AB".repeat(32))), Ok(a));
    }

    #[test]
    fn malformed_addresses_are_refused() {
        let ab = "ab".repeat(32);
        for bad in [
            String::new(),
            "ab:1".to_owned(),
            format!("{ab}:"),
            format!("{ab}:0"),
            format!("{ab}:-1"),
            format!("{ab}:+1"),
            format!("{ab}:4294967296"),
            format!("{ab}:99999999999"),
            format!("{ab}1"),
            format!("{}:1", "zz".repeat(32)),
            format!("{}é:1", "a".repeat(62)),
            format!("{}:1", "a".repeat(63)),
            format!("{ab}:1:2"),
        ] {
            assert_eq!(parse_address(&bad), Err(BAD_ADDRESS), "{bad:?} accepted");
        }
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0x00, 0x0f, 0xf0, 0xff]), "000ff0ff");
        assert_eq!(unhex::<4>("000ff0ff"), Some([0x00, 0x0f, 0xf0, 0xff]));
        assert_eq!(unhex::<4>("000FF0FF"), Some([0x00, 0x0f, 0xf0, 0xff]));
        assert_eq!(unhex::<4>("000ff0f"), None);
        assert_eq!(unhex::<2>("0g00"), None);
    }

    #[test]
    fn digits_are_grouped_by_five() {
        assert_eq!(group_digits("123456789012"), "12345 67890 12");
        assert_eq!(group_digits("12345"), "12345");
        assert_eq!(group_digits(""), "");
    }
}
