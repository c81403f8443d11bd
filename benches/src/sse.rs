//! Server-sent events, read incrementally: bytes in, each event's `data` out.
//!
//! The subset of the WHATWG event-stream format an OpenAI-compatible stream uses: `data:` lines
//! (joined with `\n` when an event has several), comment lines (`:`, keep-alives) and other fields
//! ignored, events ended by a blank line, `\n` or `\r\n` line ends. Bytes are buffered until a line
//! is complete, so a UTF-8 character split across network chunks is never cut.

/// An incremental event-stream parser.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// `data` of the event being read.
    data: Option<String>,
}

impl SseParser {
    /// Feeds `bytes`; returns the data of every event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            if line.is_empty() {
                events.extend(self.data.take());
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                let value = String::from_utf8_lossy(value);
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => self.data = Some(value.into_owned()),
                }
            }
        }
        events
    }

    /// The data of an event the stream ended without a blank line after, if any.
    pub fn finish(&mut self) -> Option<String> {
        if !self.line.is_empty() {
            // Ends the pending line; a non-blank line completes no event.
            self.push(b"\n");
        }
        self.data.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_comments_and_multiline_data() {
        let mut p = SseParser::default();
        let stream = ":\n\ndata: {\"a\":1}\n\nevent: x\ndata: one\ndata: two\n\nid: 3\r\ndata:[DONE]\r\n\r\n";
        assert_eq!(p.push(stream.as_bytes()), vec!["{\"a\":1}", "one\ntwo", "[DONE]"]);
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn split_anywhere_including_inside_a_character() {
        let stream = "data: {\"content\":\"héllo ✓\"}\n\ndata: [DONE]\n\n".as_bytes();
        for cut in 0..stream.len() {
            let mut p = SseParser::default();
            let mut events = p.push(&stream[..cut]);
            events.extend(p.push(&stream[cut..]));
            assert_eq!(events, vec!["{\"content\":\"héllo ✓\"}", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn an_unterminated_last_event_is_returned_by_finish() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: [DONE]").is_empty());
        assert_eq!(p.finish().as_deref(), Some("[DONE]"));
    }
}
