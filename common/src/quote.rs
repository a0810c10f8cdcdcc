//! Caller input shown in error messages: escaped, so that a refusal stays on one line whatever
//! the input holds (newlines, NULs, terminal escapes), and cut short, so that a 10 KB field does
//! not become a 10 KB status message (or, escaped, 60 KB: more than the 16 KiB of headers an
//! HTTP/2 client accepts, which then sees a protocol error instead of the refusal).

use std::fmt;

/// How many bytes of (escaped) input a message shows: a 128-character name or a typical
/// artifact path whole, and a message that stays well under 1 KiB whatever the input.
pub const SHOWN_BYTES: usize = 200;

/// `s` in double quotes, escaped, at most [`SHOWN_BYTES`] bytes of it, followed by its length
/// in bytes when it was cut.
pub fn quoted(s: &str) -> Quoted<'_> {
    Quoted(s)
}

/// See [`quoted`].
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        f.write_char('"')?;
        let mut shown = 0;
        let mut cut = false;
        for c in self.0.chars() {
            let escaped: String = c.escape_debug().collect();
            if shown + escaped.len() > SHOWN_BYTES {
                cut = true;
                break;
            }
            shown += escaped.len();
            f.write_str(&escaped)?;
        }
        f.write_char('"')?;
        if cut {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole_and_escaped() {
        assert_eq!(quoted("fe-1").to_string(), "\"fe-1\"");
        assert_eq!(quoted("").to_string(), "\"\"");
        assert_eq!(quoted("a\nb\0\"").to_string(), r#""a\nb\0\"""#);
    }

    #[test]
    fn long_input_is_cut_and_its_length_given() {
        let s = "\u{1}".repeat(10 * 1024);
        let shown = quoted(&s).to_string();
        assert!(shown.ends_with("... (10240 bytes)"), "{shown}");
        assert!(shown.len() < 400, "{} bytes", shown.len());
        assert!(!shown.contains('\u{1}') && !shown.contains('\n'));
        let exactly = "x".repeat(SHOWN_BYTES);
        assert_eq!(quoted(&exactly).to_string(), format!("\"{exactly}\""));
        let path = format!("/var/lib/rollgate/incoming/{}", "r".repeat(100));
        assert_eq!(
            quoted(&path).to_string(),
            format!("\"{path}\""),
            "a path is shown whole"
        );
    }
}
