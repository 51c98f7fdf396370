//! QMP's input framing: a JSON *stream*, as QEMU's json-lexer and json-streamer read it.
//! Bytes arrive in any pieces; a message ends where its braces and brackets balance (or
//! at a scalar, which is a message of its own), so several messages may share a read, one
//! may span many, and no newline is needed. QEMU's extensions are accepted: single-quoted
//! strings and the `\'` escape. After a lexical error the input is skipped up to the next
//! structural character or control character (QEMU's recovery), so a client can always
//! get back in step; bytes 0xFE and 0xFF force that.
//!
//! One difference from QEMU, for a hostile client's sake: a message is at most `limit`
//! bytes (not counting whitespace between tokens, which is never kept). A longer one is answered once, with an error, and the rest of it is skipped
//! (its nesting is still followed, so the next message is read normally).
//!
//! ```
//! use vmm::qmp::json::{JsonStreamer, Message};
//!
//! let mut s = JsonStreamer::new(64 * 1024);
//! let mut out = Vec::new();
//! s.feed(br#"{"execute": "stop"}{"exec"#, &mut out);
//! s.feed(br#"ute": 'cont'}"#, &mut out);
//! assert_eq!(out.len(), 2);
//! assert!(matches!(&out[1], Message::Value(v) if v["execute"] == "cont"));
//! ```

use serde_json::{Map, Number, Value};

/// Deepest nesting accepted (QEMU's MAX_NESTING).
pub const MAX_NESTING: usize = 1024;

/// One message read from the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A well-formed JSON value.
    Value(Value),
    /// Why the input was not one: answered as a `GenericError` without an id.
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    Str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    /// Inside a string delimited by `quote`; `escape` after a backslash.
    Str {
        quote: u8,
        escape: bool,
    },
    /// `-` seen.
    Minus,
    /// `0` seen (a leading zero may not be followed by digits).
    Zero,
    /// Digits of a non-zero integer.
    Digits,
    /// `.` seen, a digit must follow.
    Dot,
    /// Digits after the decimal point.
    Fraction,
    /// `e` or `E` seen.
    Exp,
    /// The exponent's sign seen, a digit must follow.
    ExpSign,
    /// Exponent digits.
    ExpDigits,
    /// `[a-z]+`.
    Keyword,
    /// Skipping after an error, up to a point where a token may start.
    Recovery,
}

/// The streaming reader: feed it bytes, collect [`Message`]s.
#[derive(Debug)]
pub struct JsonStreamer {
    limit: usize,
    state: State,
    /// The token being read.
    token: Vec<u8>,
    /// The current message's tokens, each with its text.
    tokens: Vec<(Tok, Vec<u8>)>,
    /// Bytes of the current message's tokens so far (whitespace between tokens is not
    /// kept, so it does not count).
    size: usize,
    braces: isize,
    brackets: isize,
    /// The current message went over the limit: follow its nesting, keep nothing.
    discarding: bool,
}

impl JsonStreamer {
    /// A reader whose messages are at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        JsonStreamer {
            limit,
            state: State::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            size: 0,
            braces: 0,
            brackets: 0,
            discarding: false,
        }
    }

    /// Reads `bytes`, appending each message completed to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Message>) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    /// Whether a message has begun and not ended (input is pending).
    pub fn in_message(&self) -> bool {
        self.state != State::Start || !self.tokens.is_empty() || self.discarding
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Message>) {
        // A character that ends a number or keyword is read again from the start.
        while let Step::Again = self.step(b, out) {}
        if self.size > self.limit && !self.discarding {
            self.discarding = true;
            self.tokens.clear();
            self.token.clear();
            out.push(Message::Error(format!(
                "QMP message longer than {} bytes: refused, the rest of it is skipped",
                self.limit
            )));
        }
    }

    /// Keeps a byte of the token being read; the message's size counts it.
    fn keep(&mut self, b: u8) {
        if !self.discarding {
            self.token.push(b);
            self.size += 1;
        }
    }

    fn step(&mut self, b: u8, out: &mut Vec<Message>) -> Step {
        use State as S;
        let digit = b.is_ascii_digit();
        let next = match (self.state, b) {
            (S::Start, b' ' | b'\t' | b'\r' | b'\n') => return Step::Consumed,
            (S::Start, b'{') => return self.single(Tok::LCurly, b, out),
            (S::Start, b'}') => return self.single(Tok::RCurly, b, out),
            (S::Start, b'[') => return self.single(Tok::LSquare, b, out),
            (S::Start, b']') => return self.single(Tok::RSquare, b, out),
            (S::Start, b':') => return self.single(Tok::Colon, b, out),
            (S::Start, b',') => return self.single(Tok::Comma, b, out),
            (S::Start, b'"' | b'\'') => S::Str {
                quote: b,
                escape: false,
            },
            (S::Start, b'-') => S::Minus,
            (S::Start, b'0') => S::Zero,
            (S::Start, b'1'..=b'9') => S::Digits,
            (S::Start, b'a'..=b'z') => S::Keyword,
            (
                S::Str {
                    quote,
                    escape: false,
                },
                b'\\',
            ) => S::Str {
                quote,
                escape: true,
            },
            (
                S::Str {
                    quote,
                    escape: false,
                },
                q,
            ) if q == quote => {
                self.keep(b);
                self.token_done(Tok::Str, out);
                return Step::Consumed;
            }
            (S::Str { quote, .. }, 0x20..=0xFD) => S::Str {
                quote,
                escape: false,
            },
            (S::Minus, b'0') => S::Zero,
            (S::Minus, b'1'..=b'9') => S::Digits,
            (S::Zero | S::Digits, b'.') => S::Dot,
            (S::Digits, _) if digit => S::Digits,
            (S::Digits | S::Fraction, b'e' | b'E') => S::Exp,
            (S::Dot | S::Fraction, _) if digit => S::Fraction,
            (S::Exp, b'+' | b'-') => S::ExpSign,
            (S::Exp | S::ExpSign | S::ExpDigits, _) if digit => S::ExpDigits,
            (S::Keyword, b'a'..=b'z') => S::Keyword,
            // A token ends at the character after it, which is read again.
            (S::Zero | S::Digits, _) if b < 0x80 && !digit => {
                self.token_done(Tok::Integer, out);
                return Step::Again;
            }
            (S::Fraction | S::ExpDigits, _) if b < 0x80 => {
                self.token_done(Tok::Float, out);
                return Step::Again;
            }
            (S::Keyword, _) if b < 0x80 => {
                self.token_done(Tok::Keyword, out);
                return Step::Again;
            }
            (S::Recovery, 0x00..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}') if b != b'\t' => {
                self.state = S::Start;
                return Step::Again;
            }
            (S::Recovery, _) => return Step::Consumed,
            _ => {
                self.keep(b);
                self.error(out);
                return Step::Consumed;
            }
        };
        self.keep(b);
        self.state = next;
        Step::Consumed
    }

    fn single(&mut self, tok: Tok, b: u8, out: &mut Vec<Message>) -> Step {
        self.keep(b);
        self.token_done(tok, out);
        Step::Consumed
    }

    /// A lexical error: QEMU's "stray" error, then recovery.
    fn error(&mut self, out: &mut Vec<Message>) {
        let stray = String::from_utf8_lossy(&self.token).into_owned();
        let discarding = self.discarding;
        self.reset();
        self.state = State::Recovery;
        if !discarding {
            out.push(Message::Error(format!(
                "JSON parse error, stray '{}'",
                super::error::bounded(&stray)
            )));
        }
    }

    fn reset(&mut self) {
        self.token.clear();
        self.tokens.clear();
        self.braces = 0;
        self.brackets = 0;
        self.size = 0;
        self.discarding = false;
        self.state = State::Start;
    }

    fn token_done(&mut self, tok: Tok, out: &mut Vec<Message>) {
        match tok {
            Tok::LCurly => self.braces += 1,
            Tok::RCurly => self.braces -= 1,
            Tok::LSquare => self.brackets += 1,
            Tok::RSquare => self.brackets -= 1,
            _ => {}
        }
        self.state = State::Start;
        let text = std::mem::take(&mut self.token);
        let open = (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0;
        if open && (self.braces + self.brackets) as usize > MAX_NESTING {
            let discarding = self.discarding;
            self.reset();
            if !discarding {
                out.push(Message::Error("JSON nesting depth limit exceeded".into()));
            }
            return;
        }
        if !self.discarding {
            self.tokens.push((tok, text));
        }
        if open {
            return;
        }
        let discarding = self.discarding;
        let tokens = std::mem::take(&mut self.tokens);
        self.reset();
        if !discarding {
            out.push(match parse(&tokens) {
                Ok(v) => Message::Value(v),
                Err(e) => Message::Error(format!("JSON parse error, {e}")),
            });
        }
    }
}

enum Step {
    Consumed,
    Again,
}

/// Builds the value from one message's tokens (QEMU's json-parser).
fn parse(tokens: &[(Tok, Vec<u8>)]) -> Result<Value, String> {
    let mut p = Parser { tokens, at: 0 };
    let v = p.value()?;
    if p.at != tokens.len() {
        return Err("expecting end of message".into());
    }
    Ok(v)
}

struct Parser<'a> {
    tokens: &'a [(Tok, Vec<u8>)],
    at: usize,
}

impl Parser<'_> {
    fn next(&mut self) -> Result<&(Tok, Vec<u8>), String> {
        let t = self.tokens.get(self.at).ok_or("premature end of input")?;
        self.at += 1;
        Ok(t)
    }

    fn peek(&self) -> Option<Tok> {
        self.tokens.get(self.at).map(|t| t.0)
    }

    fn value(&mut self) -> Result<Value, String> {
        let (tok, text) = self.next()?;
        Ok(match tok {
            Tok::LCurly => self.object()?,
            Tok::LSquare => self.array()?,
            Tok::Str => Value::String(string(text)?),
            Tok::Integer => integer(text)?,
            Tok::Float => float(text)?,
            Tok::Keyword => match text.as_slice() {
                b"true" => Value::Bool(true),
                b"false" => Value::Bool(false),
                b"null" => Value::Null,
                k => {
                    return Err(format!(
                        "invalid keyword '{}'",
                        super::error::bounded(&String::from_utf8_lossy(k))
                    ));
                }
            },
            _ => return Err("expecting value".into()),
        })
    }

    fn object(&mut self) -> Result<Value, String> {
        let mut map = Map::new();
        if self.peek() == Some(Tok::RCurly) {
            self.at += 1;
            return Ok(Value::Object(map));
        }
        loop {
            let (tok, text) = self.next()?;
            if *tok != Tok::Str {
                return Err("key is not a string in object".into());
            }
            let key = string(text)?;
            if self.next()?.0 != Tok::Colon {
                return Err("missing : in object pair".into());
            }
            let v = self.value()?;
            if map.contains_key(&key) {
                return Err(format!("duplicate key '{}'", super::error::bounded(&key)));
            }
            map.insert(key, v);
            match self.next()?.0 {
                Tok::Comma => continue,
                Tok::RCurly => return Ok(Value::Object(map)),
                _ => return Err("expected separator in dict".into()),
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        let mut list = Vec::new();
        if self.peek() == Some(Tok::RSquare) {
            self.at += 1;
            return Ok(Value::Array(list));
        }
        loop {
            list.push(self.value()?);
            match self.next()?.0 {
                Tok::Comma => continue,
                Tok::RSquare => return Ok(Value::Array(list)),
                _ => return Err("expected separator in list".into()),
            }
        }
    }
}

fn integer(text: &[u8]) -> Result<Value, String> {
    let s = std::str::from_utf8(text).map_err(|_| "invalid number")?;
    // As QEMU: int64, else uint64, else a double.
    if let Ok(n) = s.parse::<i64>() {
        return Ok(Value::Number(n.into()));
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Value::Number(n.into()));
    }
    float(text)
}

fn float(text: &[u8]) -> Result<Value, String> {
    let s = std::str::from_utf8(text).map_err(|_| "invalid number")?;
    s.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| format!("invalid number '{}'", super::error::bounded(s)))
}

/// A string token's contents, escapes decoded, checked as UTF-8.
fn string(text: &[u8]) -> Result<String, String> {
    let inner = &text[1..text.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let e = *inner.get(i).ok_or("invalid escape sequence in string")?;
        i += 1;
        let c = match e {
            b'"' => '"',
            b'\'' => '\'',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(inner, &mut i)?;
                let cp = if (0xD800..0xDC00).contains(&hi) {
                    // A surrogate pair: the low half must follow.
                    if inner.get(i..i + 2) != Some(b"\\u") {
                        return Err("missing second half of surrogate pair".into());
                    }
                    i += 2;
                    let lo = hex4(inner, &mut i)?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err("invalid second half of surrogate pair".into());
                    }
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else {
                    hi
                };
                char::from_u32(cp).ok_or("invalid \\u escape in string")?
            }
            _ => return Err("invalid escape sequence in string".into()),
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    String::from_utf8(out).map_err(|_| "invalid UTF-8 sequence in string".into())
}

fn hex4(s: &[u8], i: &mut usize) -> Result<u32, String> {
    let h = s
        .get(*i..*i + 4)
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or("invalid hex escape sequence in string")?;
    *i += 4;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all(pieces: &[&[u8]]) -> Vec<Message> {
        let mut s = JsonStreamer::new(1024);
        let mut out = Vec::new();
        for p in pieces {
            s.feed(p, &mut out);
        }
        out
    }

    fn v(x: Value) -> Message {
        Message::Value(x)
    }

    #[test]
    fn messages_end_where_their_nesting_balances() {
        assert_eq!(
            all(&[br#"{"execute":"a"}{"execute":"b"}"#]),
            vec![v(json!({"execute": "a"})), v(json!({"execute": "b"}))]
        );
        // One message split over many reads, byte by byte.
        let msg = br#"{ "execute" : "migrate", "arguments": {"uri": "tcp:[::1]:4"}, "id": [1, {"x": null}] }"#;
        let pieces: Vec<&[u8]> = msg.chunks(1).collect();
        assert_eq!(
            all(&pieces),
            vec![v(
                json!({"execute": "migrate", "arguments": {"uri": "tcp:[::1]:4"}, "id": [1, {"x": null}]})
            )]
        );
        // Pretty-printed, with CRLF and tabs.
        assert_eq!(
            all(&[b"{\r\n\t\"execute\": \"stop\",\r\n\t\"id\": 1\r\n}\r\n"]),
            vec![v(json!({"execute": "stop", "id": 1}))]
        );
        // Scalars are messages of their own; whitespace alone is none.
        assert_eq!(
            all(&[b"123 \"s\" true", b"  \n\n"]),
            vec![v(json!(123)), v(json!("s")), v(json!(true))]
        );
        // `true` ends only when the next byte arrives.
        let mut s = JsonStreamer::new(1024);
        let mut out = Vec::new();
        s.feed(b"true", &mut out);
        assert!(out.is_empty() && s.in_message());
        s.feed(b"\n", &mut out);
        assert_eq!(out, vec![v(json!(true))]);
    }

    #[test]
    fn qemu_extensions_and_escapes() {
        assert_eq!(
            all(&[br#"{'execute': 'it\'s "x"', "u": "\u00e9\ud83d\ude00\n\/"}"#]),
            vec![v(json!({"execute": "it's \"x\"", "u": "é😀\n/"}))]
        );
        assert_eq!(
            all(&[b"[0, -1, 1.5, -2e3, 18446744073709551615]"]),
            vec![v(json!([0, -1, 1.5, -2000.0, 18446744073709551615u64]))]
        );
    }

    #[test]
    fn errors_are_reported_and_the_stream_goes_on() {
        let out = all(&[b"}{\"a\":1}"]);
        assert!(matches!(&out[0], Message::Error(e) if e.contains("JSON parse error")));
        assert_eq!(out[1], v(json!({"a": 1})));

        // A stray byte: skipped up to the next brace.
        let out = all(&[b"{\"a\": @@@ 1}\n{\"b\": 2}"]);
        assert!(
            matches!(&out[0], Message::Error(e) if e.contains("stray '@'")),
            "{out:?}"
        );
        assert_eq!(out.last(), Some(&v(json!({"b": 2}))));

        for (bad, needle) in [
            (&b"{\"a\" 1}"[..], "missing :"),
            (b"{1: 2}", "key is not a string"),
            (b"[1 2]", "separator"),
            (b"{\"a\": nope}", "invalid keyword 'nope'"),
            (b"{\"a\": 1, \"a\": 2}", "duplicate key"),
            (b"[\"\\x\"]", "invalid escape"),
            (b"[\"\\ud800\"]", "surrogate"),
            (b"[\"\xff\"]", "stray"),
            (b"[01]", "stray"),
        ] {
            let out = all(&[bad, b"\n"]);
            assert!(
                matches!(&out[0], Message::Error(e) if e.contains(needle)),
                "{}: {out:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Invalid UTF-8 inside a string.
        let out = all(&[b"[\"\xc3\x28\"]"]);
        assert!(
            matches!(&out[0], Message::Error(e) if e.contains("UTF-8")),
            "{out:?}"
        );
    }

    #[test]
    fn a_message_over_the_limit_is_refused_once_and_skipped() {
        let mut s = JsonStreamer::new(100);
        let mut out = Vec::new();
        let big = format!(
            r#"{{"execute": "x", "arguments": {{"s": "{}", "l": [[[{{}}]]]}}}}"#,
            "y".repeat(5000)
        );
        for piece in big.as_bytes().chunks(7) {
            s.feed(piece, &mut out);
        }
        s.feed(br#"{"execute": "after"}"#, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], Message::Error(e) if e.contains("longer than 100 bytes")));
        assert_eq!(out[1], v(json!({"execute": "after"})));
        // Exactly at the limit is fine.
        let exact = format!(r#"{{"s":"{}"}}"#, "z".repeat(100 - 8));
        assert_eq!(exact.len(), 100);
        let mut out = Vec::new();
        s.feed(exact.as_bytes(), &mut out);
        assert!(matches!(&out[..], [Message::Value(_)]), "{out:?}");
    }

    #[test]
    fn nesting_is_bounded() {
        let mut s = JsonStreamer::new(1 << 20);
        let mut out = Vec::new();
        s.feed(&vec![b'['; MAX_NESTING + 5], &mut out);
        assert!(matches!(&out[0], Message::Error(e) if e.contains("nesting")));
    }
}
