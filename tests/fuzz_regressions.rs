//! One test per finding of the fuzz targets (docs/FUZZING.md): the input that failed, run
//! through the decoder it broke, with the behaviour the fix gives.

use oc_discovery::contract::{decode_intake, Decoded, ErrorCode};
use oc_testkit::fuzzing::{self, MAX_EVENT_BYTES, OWN_ID};

fn event_with(payload_fields: &str) -> String {
    format!(
        r#"{{"action":"PB_CREATE","data_type":"D","payload":{{"id":"r1","creator_id":"{OWN_ID}",{payload_fields}}}}}"#
    )
}

fn event_with_string_payload(payload_fields: &str) -> String {
    let inner = format!(r#"{{"id":"r1","creator_id":"{OWN_ID}",{payload_fields}}}"#);
    format!(
        r#"{{"action":"PB_CREATE","data_type":"D","payload":{}}}"#,
        serde_json::to_string(&inner).unwrap()
    )
}

/// `intake` finding: serde_json validates a raw value (how intake keeps the payload as
/// text) without a nesting limit and without reading numbers or `\u` escapes, so intake
/// accepted resources that can never become a JSON tree. Search and both stores read
/// resources as trees: such a resource became `null` in search results, and every MongoDB
/// partner refused it as "not a JSON object". Now intake refuses it with `invalid_field`.
#[test]
fn a_resource_that_is_not_a_json_tree_is_refused_at_intake() {
    let deep = format!(r#""x":{}{}"#, "[".repeat(200), "]".repeat(200));
    let untrees = [
        event_with(&deep),
        event_with_string_payload(&deep),
        event_with(r#""n":1e400"#),
        event_with(r#""s":"\ud800""#),
        event_with(r#""\udfff":1"#),
    ];
    for body in &untrees {
        let refusal =
            decode_intake(body.as_bytes(), OWN_ID, MAX_EVENT_BYTES).expect_err(&format!("accepted: {body}"));
        assert_eq!(refusal.code, ErrorCode::InvalidField, "{body}: {refusal}");
        assert!(refusal.message.contains("JSON tree"), "{refusal}");
        fuzzing::intake(body.as_bytes());
    }
    // What a tree can hold still passes: 127 levels, large numbers, paired surrogates.
    let fine = [
        event_with(&format!(r#""x":{}{}"#, "[".repeat(126), "]".repeat(126))),
        event_with(r#""n":1e300,"m":18446744073709551615,"k":-9223372036854775808"#),
        event_with(r#""s":"\ud83d\ude00 \u00e9""#),
    ];
    for body in &fine {
        let decoded = decode_intake(body.as_bytes(), OWN_ID, MAX_EVENT_BYTES);
        assert!(matches!(decoded, Ok(Decoded::Accept(_))), "{body}: {decoded:?}");
        fuzzing::intake(body.as_bytes());
    }
}
