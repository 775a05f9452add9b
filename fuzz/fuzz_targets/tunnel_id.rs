//! Arbitrary text as a tunnel id and as a host label. Whatever parses must print back to itself
//! (ids are canonical), have a label of at most 63 DNS-safe octets, and parse back from that label.
#![no_main]

use ferry_codec::TunnelId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(id) = text.parse::<TunnelId>() {
        assert_eq!(id.to_string().parse::<TunnelId>().as_ref(), Ok(&id));
        assert!(text.eq_ignore_ascii_case(id.as_str()));
        check_label(&id);
    }
    if let Ok(id) = TunnelId::from_label(text) {
        assert!(text.eq_ignore_ascii_case(&id.to_label()));
        check_label(&id);
    }
});

fn check_label(id: &TunnelId) {
    let label = id.to_label();
    assert!(label.len() <= 63);
    assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    assert!(!label.starts_with('-') && !label.ends_with('-'));
    assert_eq!(TunnelId::from_label(&label).as_ref(), Ok(id));
}
