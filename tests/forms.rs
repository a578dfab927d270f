//! Text forms and serde of addresses, ids, states and records: round trips
//! (text, JSON, bincode) and refusal of every non-canonical input.

use std::str::FromStr;

use cubbyhole::forms::ParseError;
use cubbyhole::storage::{
    ContactRecord, DeliveryState, Failure, InboxMessage, MessageId, OutboxEntry, PeerRecord,
    SentMessage, Trust,
};
use cubbyhole::transport::{DeviceAddress, Envelope, EnvelopeId, MailboxId};
use cubbyhole::IdentityKeyPair;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A valid identity key (the public key of seed [1; 32]), as hex written
/// here, not by the code under test.
fn key_hex() -> String {
    hex::encode(IdentityKeyPair::from_seed(&[1; 32]).public().as_bytes())
}

fn address(seed: u8, device_id: u32) -> DeviceAddress {
    DeviceAddress::new(IdentityKeyPair::from_seed(&[seed; 32]).public(), device_id)
}

fn text_round_trip<T>(value: &T, expected: &str)
where
    T: FromStr<Err = ParseError> + std::fmt::Display + PartialEq + std::fmt::Debug,
{
    assert_eq!(value.to_string(), expected);
    assert_eq!(expected.parse::<T>().as_ref(), Ok(value));
}

fn json_round_trip<T>(value: &T, expected: &str)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_string(value).expect("serializes");
    assert_eq!(json, expected);
    assert_eq!(
        &serde_json::from_str::<T>(&json).expect("deserializes"),
        value
    );
}

fn binary_round_trip<T>(value: &T) -> Vec<u8>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = bincode::serialize(value).expect("serializes");
    assert_eq!(
        &bincode::deserialize::<T>(&bytes).expect("deserializes"),
        value
    );
    bytes
}

#[test]
fn device_address_text() {
    let a = address(1, 7);
    text_round_trip(&a, &format!("{}.7", key_hex()));
    text_round_trip(&address(1, 0), &format!("{}.0", key_hex()));
    text_round_trip(&address(1, u32::MAX), &format!("{}.4294967295", key_hex()));
}

#[test]
fn device_address_refusals() {
    let k = key_hex();
    let cases: Vec<(String, ParseError)> = vec![
        (format!("{k}.07"), ParseError::DeviceNumber),
        (format!("{k}.+7"), ParseError::DeviceNumber),
        (format!("{k}.-1"), ParseError::DeviceNumber),
        (format!("{k}."), ParseError::DeviceNumber),
        (format!("{k}.4294967296"), ParseError::DeviceNumber),
        (format!("{k}.1.2"), ParseError::DeviceNumber),
        (format!("{k}. 1"), ParseError::DeviceNumber),
        (format!("{k}.12345678901"), ParseError::TooLong),
        (k.clone(), ParseError::Separator),
        (format!("{k}:1"), ParseError::Separator),
        (format!("{}.1", k.to_uppercase()), ParseError::Hex),
        (format!("{}.1", &k[2..]), ParseError::Length),
        (format!("00{}.1", &k[..60]), ParseError::Length),
        (format!("{}zz.1", &k[..62]), ParseError::Hex),
        (format!(" {k}.1"), ParseError::Length),
        // The identity of a small-order point (y = 1) is not a key.
        (format!("01{}.1", "00".repeat(31)), ParseError::IdentityKey),
        // y = p (not canonical).
        (
            format!("ed{}7f.1", "ff".repeat(30)),
            ParseError::IdentityKey,
        ),
        (String::new(), ParseError::Separator),
        ("x".repeat(10_000), ParseError::TooLong),
    ];
    for (text, error) in cases {
        assert_eq!(text.parse::<DeviceAddress>(), Err(error), "{text:?}");
    }
}

#[test]
fn ids_text_and_refusals() {
    let m = MailboxId([0xab; 32]);
    text_round_trip(&m, &"ab".repeat(32));
    text_round_trip(&EnvelopeId([0x01; 16]), &"01".repeat(16));
    text_round_trip(&MessageId([0xf0; 16]), &"f0".repeat(16));
    assert_eq!("AB".repeat(32).parse::<MailboxId>(), Err(ParseError::Hex));
    assert_eq!(
        "ab".repeat(31).parse::<MailboxId>(),
        Err(ParseError::Length)
    );
    assert_eq!(
        "ab".repeat(33).parse::<MailboxId>(),
        Err(ParseError::TooLong)
    );
    assert_eq!(
        "0".repeat(31).parse::<EnvelopeId>(),
        Err(ParseError::Length)
    );
    assert_eq!("g".repeat(32).parse::<MessageId>(), Err(ParseError::Hex));
    assert_eq!("".parse::<MessageId>(), Err(ParseError::Length));
    assert_eq!(
        format!("+{}", "0".repeat(31)).parse::<MessageId>(),
        Err(ParseError::Hex)
    );
}

#[test]
fn enums_text_and_refusals() {
    text_round_trip(&Trust::Unvalidated, "unvalidated");
    text_round_trip(&Trust::Validated, "validated");
    text_round_trip(&Trust::Compromised, "compromised");
    text_round_trip(&Failure::TimedOut, "timed_out");
    text_round_trip(&Failure::Compromised, "compromised");
    text_round_trip(&Failure::Refused, "refused");
    text_round_trip(&DeliveryState::Stored, "stored");
    text_round_trip(&DeliveryState::Deposited, "deposited");
    text_round_trip(&DeliveryState::Resent, "resent");
    text_round_trip(&DeliveryState::Delivered, "delivered");
    text_round_trip(
        &DeliveryState::Failed(Failure::TimedOut),
        "failed:timed_out",
    );
    text_round_trip(
        &DeliveryState::Failed(Failure::Compromised),
        "failed:compromised",
    );
    text_round_trip(&DeliveryState::Failed(Failure::Refused), "failed:refused");
    for bad in [
        "Validated",
        "VALIDATED",
        " validated",
        "validated ",
        "",
        "trusted",
    ] {
        assert_eq!(bad.parse::<Trust>(), Err(ParseError::Name), "{bad:?}");
    }
    assert_eq!("failed".parse::<DeliveryState>(), Err(ParseError::Name));
    assert_eq!("failed:".parse::<DeliveryState>(), Err(ParseError::Name));
    assert_eq!("timed_out".parse::<DeliveryState>(), Err(ParseError::Name));
    assert_eq!(
        "x".repeat(1000).parse::<Failure>(),
        Err(ParseError::TooLong)
    );
}

#[test]
fn leaves_json_and_binary() {
    let a = address(2, 3);
    let a_text = format!(
        "\"{}.3\"",
        hex::encode(IdentityKeyPair::from_seed(&[2; 32]).public().as_bytes())
    );
    json_round_trip(&a, &a_text);
    // bincode: a byte string is a u64 length, then the bytes.
    let mut expected = 36u64.to_le_bytes().to_vec();
    expected.extend_from_slice(&a.identity);
    expected.extend_from_slice(&[0, 0, 0, 3]);
    assert_eq!(binary_round_trip(&a), expected);

    json_round_trip(&MailboxId([7; 32]), &format!("\"{}\"", "07".repeat(32)));
    json_round_trip(&EnvelopeId([8; 16]), &format!("\"{}\"", "08".repeat(16)));
    json_round_trip(&MessageId([9; 16]), &format!("\"{}\"", "09".repeat(16)));
    let mut expected = 16u64.to_le_bytes().to_vec();
    expected.extend_from_slice(&[8; 16]);
    assert_eq!(binary_round_trip(&EnvelopeId([8; 16])), expected);
    binary_round_trip(&MailboxId([7; 32]));
    binary_round_trip(&MessageId([9; 16]));

    json_round_trip(&Trust::Validated, "\"validated\"");
    assert_eq!(binary_round_trip(&Trust::Unvalidated), [0]);
    assert_eq!(binary_round_trip(&Trust::Validated), [1]);
    assert_eq!(binary_round_trip(&Trust::Compromised), [2]);
    json_round_trip(&Failure::Refused, "\"refused\"");
    assert_eq!(binary_round_trip(&Failure::Refused), [3]);
    json_round_trip(
        &DeliveryState::Failed(Failure::TimedOut),
        "\"failed:timed_out\"",
    );
    assert_eq!(
        binary_round_trip(&DeliveryState::Failed(Failure::TimedOut)),
        [17]
    );
    assert_eq!(binary_round_trip(&DeliveryState::Delivered), [3]);
}

#[test]
fn leaves_refuse_malformed_serialized_input() {
    let k = key_hex();
    for bad in [
        format!("\"{k}.01\""),
        format!("\"{}.1\"", k.to_uppercase()),
        format!("\"01{}.1\"", "00".repeat(31)),
        "7".to_string(),
        "[1,2,3]".to_string(),
        "null".to_string(),
    ] {
        assert!(
            serde_json::from_str::<DeviceAddress>(&bad).is_err(),
            "{bad}"
        );
    }
    let err = serde_json::from_str::<DeviceAddress>(&format!("\"01{}.1\"", "00".repeat(31)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a valid identity key"), "{err}");
    assert!(serde_json::from_str::<Trust>("\"Validated\"").is_err());
    assert!(serde_json::from_str::<Trust>("1").is_err());
    assert!(serde_json::from_str::<MessageId>(&format!("\"{}\"", "0".repeat(33))).is_err());

    // Binary: wrong lengths, an invalid key, unknown codes, truncation.
    let mut short = 35u64.to_le_bytes().to_vec();
    short.extend_from_slice(&[0; 35]);
    assert!(bincode::deserialize::<DeviceAddress>(&short).is_err());
    let mut small_order = 36u64.to_le_bytes().to_vec();
    small_order.push(1);
    small_order.extend_from_slice(&[0; 35]);
    assert!(bincode::deserialize::<DeviceAddress>(&small_order).is_err());
    let mut long = 17u64.to_le_bytes().to_vec();
    long.extend_from_slice(&[0; 17]);
    assert!(bincode::deserialize::<MessageId>(&long).is_err());
    // A length prefix claiming far more than the input holds.
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 4]);
    assert!(bincode::deserialize::<EnvelopeId>(&huge).is_err());
    assert!(bincode::deserialize::<Trust>(&[3]).is_err());
    assert!(bincode::deserialize::<Failure>(&[0]).is_err());
    assert!(bincode::deserialize::<DeliveryState>(&[16]).is_err());
    assert!(bincode::deserialize::<DeliveryState>(&[4]).is_err());
    assert!(bincode::deserialize::<DeliveryState>(&[]).is_err());
}

fn records() -> (
    PeerRecord,
    OutboxEntry,
    InboxMessage,
    SentMessage,
    ContactRecord,
) {
    let peer = PeerRecord {
        address: address(3, 1),
        trust: Trust::Compromised,
        first_seen: 1_700_000_000,
    };
    let outbox = OutboxEntry {
        to: address(4, 2),
        envelope: Envelope {
            id: EnvelopeId([0x11; 16]),
            payload: vec![1, 2, 3],
        },
        created: 5,
        message: Some(MessageId([0x22; 16])),
    };
    let inbox = InboxMessage {
        envelope_id: EnvelopeId([0x33; 16]),
        from: address(5, 9),
        body: b"hi".to_vec(),
        received_at: 6,
    };
    let sent = SentMessage {
        id: MessageId([0x44; 16]),
        to: address(6, 1),
        body: Vec::new(),
        state: DeliveryState::Failed(Failure::Compromised),
        created: 7,
        last_sent: 8,
        sends: 3,
    };
    let contact = ContactRecord {
        name: b"Bob".to_vec(),
        devices: vec![address(7, 1), address(8, 2)],
        previous: vec![[0x55; 32]],
        changed_at: 9,
    };
    (peer, outbox, inbox, sent, contact)
}

fn addr_json(seed: u8, device: u32) -> String {
    format!(
        "\"{}.{device}\"",
        hex::encode(IdentityKeyPair::from_seed(&[seed; 32]).public().as_bytes())
    )
}

#[test]
fn records_json() {
    let (peer, outbox, inbox, sent, contact) = records();
    json_round_trip(
        &peer,
        &format!(
            r#"{{"address":{},"trust":"compromised","first_seen":1700000000}}"#,
            addr_json(3, 1)
        ),
    );
    json_round_trip(
        &outbox,
        &format!(
            r#"{{"to":{},"envelope":{{"id":"{}","payload":"010203"}},"created":5,"message":"{}"}}"#,
            addr_json(4, 2),
            "11".repeat(16),
            "22".repeat(16)
        ),
    );
    let no_message = OutboxEntry {
        message: None,
        ..outbox.clone()
    };
    let json = serde_json::to_string(&no_message).unwrap();
    assert!(json.ends_with(r#""message":null}"#), "{json}");
    assert_eq!(
        serde_json::from_str::<OutboxEntry>(&json).unwrap(),
        no_message
    );
    json_round_trip(
        &inbox,
        &format!(
            r#"{{"envelope_id":"{}","from":{},"body":"6869","received_at":6}}"#,
            "33".repeat(16),
            addr_json(5, 9)
        ),
    );
    json_round_trip(
        &sent,
        &format!(
            r#"{{"id":"{}","to":{},"body":"","state":"failed:compromised","created":7,"last_sent":8,"sends":3}}"#,
            "44".repeat(16),
            addr_json(6, 1)
        ),
    );
    json_round_trip(
        &contact,
        &format!(
            r#"{{"name":"426f62","devices":[{},{}],"previous":["{}"],"changed_at":9}}"#,
            addr_json(7, 1),
            addr_json(8, 2),
            "55".repeat(32)
        ),
    );
}

#[test]
fn records_binary() {
    let (peer, outbox, inbox, sent, contact) = records();
    // PeerRecord: address (8 + 36), trust (1), first_seen (8).
    let bytes = binary_round_trip(&peer);
    assert_eq!(bytes.len(), 8 + 36 + 1 + 8);
    assert_eq!(bytes[44], 2);
    binary_round_trip(&outbox);
    binary_round_trip(&OutboxEntry {
        message: None,
        ..outbox
    });
    binary_round_trip(&inbox);
    binary_round_trip(&sent);
    binary_round_trip(&contact);
    // Truncated anywhere: an error, not a panic.
    let bytes = bincode::serialize(&contact).unwrap();
    for n in 0..bytes.len() {
        assert!(
            bincode::deserialize::<ContactRecord>(&bytes[..n]).is_err(),
            "{n}"
        );
    }
}

#[test]
fn records_refuse_malformed_json() {
    let (peer, _, inbox, _, contact) = records();
    let json = serde_json::to_string(&peer).unwrap();
    // Unknown, missing and duplicate fields.
    let extra = json.replace('}', r#","x":1}"#);
    assert!(serde_json::from_str::<PeerRecord>(&extra).is_err());
    let missing = json.replace(r#","first_seen":1700000000"#, "");
    assert!(serde_json::from_str::<PeerRecord>(&missing).is_err());
    let twice = json.replace('}', r#","first_seen":1}"#);
    assert!(serde_json::from_str::<PeerRecord>(&twice).is_err());
    // Bodies: odd length, uppercase, not hex.
    let json = serde_json::to_string(&inbox).unwrap();
    for body in ["686", "6A69", "zz"] {
        let bad = json.replace("\"6869\"", &format!("\"{body}\""));
        assert!(
            serde_json::from_str::<InboxMessage>(&bad).is_err(),
            "{body}"
        );
    }
    // A contact's earlier key of the wrong length.
    let json = serde_json::to_string(&contact).unwrap();
    let bad = json.replace(&"55".repeat(32), &"55".repeat(31));
    assert!(serde_json::from_str::<ContactRecord>(&bad).is_err());
    // Over the bounds its byte encoding keeps.
    let long_name = ContactRecord {
        name: vec![b'a'; ContactRecord::MAX_NAME + 1],
        ..contact.clone()
    };
    let json = serde_json::to_string(&long_name).unwrap();
    let err = serde_json::from_str::<ContactRecord>(&json).unwrap_err();
    assert!(err.to_string().contains("longer"), "{err}");
    let many_keys = ContactRecord {
        previous: vec![[1; 32]; ContactRecord::MAX_PREVIOUS + 1],
        ..contact.clone()
    };
    let json = serde_json::to_string(&many_keys).unwrap();
    assert!(serde_json::from_str::<ContactRecord>(&json).is_err());
    let at_bounds = ContactRecord {
        name: vec![b'a'; ContactRecord::MAX_NAME],
        previous: vec![[1; 32]; ContactRecord::MAX_PREVIOUS],
        ..contact
    };
    json_round_trip(&at_bounds, &serde_json::to_string(&at_bounds).unwrap());
}

fn valid_address() -> impl Strategy<Value = DeviceAddress> {
    (any::<[u8; 32]>(), any::<u32>()).prop_map(|(seed, device)| {
        DeviceAddress::new(IdentityKeyPair::from_seed(&seed).public(), device)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn address_round_trips(a in valid_address()) {
        let text = a.to_string();
        prop_assert_eq!(text.len(), 65 + a.device_id.to_string().len());
        prop_assert_eq!(text.parse::<DeviceAddress>(), Ok(a));
        prop_assert_eq!(serde_json::from_str::<DeviceAddress>(&serde_json::to_string(&a).unwrap()).unwrap(), a);
        prop_assert_eq!(bincode::deserialize::<DeviceAddress>(&bincode::serialize(&a).unwrap()).unwrap(), a);
    }

    #[test]
    fn ids_round_trip(m in any::<[u8; 32]>(), e in any::<[u8; 16]>()) {
        let (m, e, id) = (MailboxId(m), EnvelopeId(e), MessageId(e));
        prop_assert_eq!(m.to_string().parse::<MailboxId>(), Ok(m));
        prop_assert_eq!(e.to_string().parse::<EnvelopeId>(), Ok(e));
        prop_assert_eq!(id.to_string().parse::<MessageId>(), Ok(id));
        prop_assert_eq!(m.to_string(), hex::encode(m.0));
        prop_assert_eq!(bincode::deserialize::<MailboxId>(&bincode::serialize(&m).unwrap()).unwrap(), m);
    }

    /// Whatever parses is canonical: it prints back to the same text.
    #[test]
    fn parsed_text_is_canonical(s in "[0-9a-fA-F.+ -]{0,80}") {
        if let Ok(a) = s.parse::<DeviceAddress>() {
            prop_assert_eq!(a.to_string(), s.clone());
        }
        if let Ok(m) = s.parse::<MailboxId>() {
            prop_assert_eq!(m.to_string(), s.clone());
        }
        if let Ok(m) = s.parse::<MessageId>() {
            prop_assert_eq!(m.to_string(), s);
        }
    }

    /// The device number: canonical decimal only.
    #[test]
    fn device_numbers(n in any::<u64>(), zeros in 1usize..3) {
        let k = key_hex();
        let parsed = format!("{k}.{n}").parse::<DeviceAddress>();
        if n <= u64::from(u32::MAX) {
            prop_assert_eq!(parsed.map(|a| a.device_id), Ok(n as u32));
        } else if n.to_string().len() > 10 {
            // Longer than the longest canonical address.
            prop_assert_eq!(parsed, Err(ParseError::TooLong));
        } else {
            prop_assert_eq!(parsed, Err(ParseError::DeviceNumber));
        }
        let padded = format!("{k}.{}{n}", "0".repeat(zeros)).parse::<DeviceAddress>();
        prop_assert!(padded.is_err());
    }

    /// Arbitrary bytes never panic the binary decoders.
    #[test]
    fn arbitrary_binary_input(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = bincode::deserialize::<DeviceAddress>(&bytes);
        let _ = bincode::deserialize::<PeerRecord>(&bytes);
        let _ = bincode::deserialize::<ContactRecord>(&bytes);
        let _ = bincode::deserialize::<SentMessage>(&bytes);
        let _ = bincode::deserialize::<OutboxEntry>(&bytes);
    }
}
