//! Text that comes from outside (the API's answers, HAProxy's messages
//! about them) on its way into logs, `/status` and a terminal: bounded in
//! length, and with control characters escaped, so that it can neither
//! forge a log line (a newline) nor drive the operator's terminal (an
//! escape sequence), nor fill memory or the journal.

/// At most `max` characters of `text`, every control character escaped
/// (`\n`, `\t`, `\u{1b}` …); what is cut is said.
pub fn untrusted(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 16);
    for (shown, (i, c)) in text.char_indices().enumerate() {
        if shown >= max {
            out.push_str(&format!("… ({} more bytes)", text.len() - i));
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => {
                out.push_str(&c.escape_unicode().to_string());
            }
            c => out.push(c),
        }
    }
    out
}

/// The length of text from the API kept in messages.
pub const API_TEXT: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_cut() {
        assert_eq!(untrusted("ok", 10), "ok");
        assert_eq!(
            untrusted("a\nWARN forged line\x1b]0;owned\x07", 100),
            "a\\nWARN forged line\\u{1b}]0;owned\\u{7}"
        );
        let long = "x".repeat(200_000);
        let cut = untrusted(&long, 200);
        assert!(cut.starts_with(&"x".repeat(200)) && cut.ends_with("… (199800 more bytes)"), "{}", cut.len());
        assert_eq!(untrusted("é€😀", 2), "é€… (4 more bytes)");
    }
}
