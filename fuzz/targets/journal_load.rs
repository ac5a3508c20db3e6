//! The journal loader: any bytes are either a journal or an error naming why; never a panic. A journal
//! that loads writes back to the same value (nothing is lost or invented in a round trip).

/// One input: never a panic, and the checks above hold.
pub fn run(data: &[u8]) {
    if let Ok(j) = keyrotd::journal::parse(data) {
        let again = serde_json::to_vec(&j).expect("a loaded journal serializes");
        let back = keyrotd::journal::parse(&again).expect("a written journal loads");
        assert_eq!(back, j, "a journal changed in a round trip");
    }
}
