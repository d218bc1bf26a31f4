//! docs/protocol.md says what the gateway does: each close code it can send, and the errors it
//! replies with, are listed there (a client is written against the doc, not the code).

use std::collections::BTreeSet;

use ws_gateway::access::close;

fn protocol_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The paragraph of the doc that lists the WebSocket close codes.
fn close_code_paragraph(doc: &str) -> &str {
    let start = doc
        .find("WebSocket close codes:")
        .expect("docs/protocol.md has a `WebSocket close codes:` paragraph");
    let rest = &doc[start..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

#[test]
fn the_doc_lists_exactly_the_close_codes_the_gateway_sends() {
    let doc = protocol_doc();
    let paragraph = close_code_paragraph(&doc);
    let listed: BTreeSet<u16> = paragraph
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|word| word.parse().ok())
        .filter(|code| (1000..5000).contains(code))
        .collect();
    let defined: BTreeSet<u16> = close::ALL.iter().copied().collect();
    assert_eq!(
        listed, defined,
        "docs/protocol.md's close codes differ from ws_gateway::access::close:\n{paragraph}"
    );
}

#[test]
fn the_doc_names_the_events_lost_error() {
    let doc = protocol_doc();
    let name = format!("`{}`", ws_gateway::connection::EVENTS_LOST);
    assert!(
        doc.contains(&name),
        "docs/protocol.md never mentions {name}"
    );
}

#[test]
fn the_doc_names_the_token_expired_error() {
    let doc = protocol_doc();
    let name = format!("`{}`", ws_gateway::sse::TOKEN_EXPIRED);
    assert!(
        doc.contains(&name),
        "docs/protocol.md never mentions {name}"
    );
}
