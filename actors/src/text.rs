//! JSON kept as the text it arrived as (#16).
//!
//! A trigger's payload and a tick's output are opaque to tickgate. It stores them, hands them to
//! the runner and shows them to callers, but never needs their values as a tree on the hot path.
//! Held as checked text, a payload is validated once when it enters, copied (not re-encoded) into
//! the store record, the runner's input and every answer, and freed as one allocation. As a
//! `serde_json::Value` it was parsed into nodes, encoded again for each of those, and freed node
//! by node: about a sixth of a fire-and-forget request's instructions.
//!
//! The few readers that look inside a payload (a task title from a provider's fields, a delivery
//! id) use [`Members`], which borrows an object's members from the text without building a tree.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

/// One JSON value as valid JSON text on one line. Built only by the constructors here, each of
/// which checks or produces valid JSON, so every holder may hand the text on as it is.
///
/// One line: a line break in JSON text can only be whitespace between tokens (strings hold them
/// escaped), and the persistent runners' protocol is one JSON document per line, so breaks are
/// turned into spaces on the way in. The value is unchanged.
#[derive(Clone)]
pub struct JsonText(Box<RawValue>);

/// Why a text was refused by [`JsonText::parse_limited`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Not JSON, with serde_json's description of where it broke.
    #[error("{0}")]
    Invalid(String),
    /// Valid JSON, but nested deeper than the limit; holds the depth found.
    #[error("nested {0} levels deep")]
    TooDeep(usize),
}

impl JsonText {
    /// `null`.
    pub fn null() -> Self {
        Self(RawValue::NULL.to_owned())
    }

    /// `{}`: the inputs of a trigger without a body.
    pub fn empty_object() -> Self {
        Self(RawValue::from_string("{}".to_string()).unwrap_or_else(|_| RawValue::NULL.to_owned()))
    }

    /// Encodes a value: for values built in code (a schedule's inputs, an A2A message, a runner's
    /// answer that was parsed to be checked); a payload that arrives as text is taken with
    /// [`JsonText::parse_limited`] instead, without a tree.
    pub fn from_value(value: &Value) -> Self {
        Self::encode(value)
    }

    /// Encodes anything serializable as compact JSON, which holds no line breaks; `to_raw_value`
    /// keeps the text it wrote without checking it again. Serializing a `Value` or tickgate's
    /// own types cannot fail; should a type refuse, the text is `null`.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Self {
        serde_json::value::to_raw_value(value)
            .map(Self)
            .unwrap_or_else(|_| Self::null())
    }

    /// Checks `bytes` as one JSON value nested at most `max_depth` arrays and objects deep (`{}`
    /// is 1) and keeps its text, without the whitespace around it. The check walks the text
    /// without recursion, so a hostile nesting cannot exhaust the stack; serde_json's own limit
    /// (128) still applies while it validates.
    pub fn parse_limited(bytes: &[u8], max_depth: usize) -> Result<Self, TextError> {
        // A refused text is read again as a tree, for the message a caller got when the door
        // built one: a tree reports what it meets first, an unpaired surrogate included.
        let tree_error = |e: serde_json::Error| {
            TextError::Invalid(
                serde_json::from_slice::<Value>(bytes)
                    .err()
                    .unwrap_or(e)
                    .to_string(),
            )
        };
        let raw: &RawValue = serde_json::from_slice(bytes).map_err(tree_error)?;
        let (found, breaks) = match check(raw.get().as_bytes()) {
            Some(checked) => (checked.depth, checked.breaks),
            // What a tree refuses (an unpaired surrogate, a number out of range) is refused in
            // serde_json's own words, the message a caller got when the door built a tree. Should
            // the tree read it after all, serde_json's answer stands and the text is kept.
            None => match serde_json::from_slice::<Value>(bytes) {
                Err(e) => return Err(TextError::Invalid(e.to_string())),
                Ok(v) => (value_depth(&v), true),
            },
        };
        if found > max_depth {
            return Err(TextError::TooDeep(found));
        }
        let raw = raw.to_owned();
        Ok(if breaks {
            Self::one_line(raw)
        } else {
            Self(raw)
        })
    }

    /// Text read back from the store, which wrote it from a [`JsonText`]; checked again (a
    /// damaged record must be reported, not handed on), without a nesting limit: what the store
    /// wrote it must read back, and the parsers in front of it bound the depth.
    pub fn from_stored(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        de.disable_recursion_limit();
        let raw = <&RawValue>::deserialize(&mut de)?;
        de.end()?;
        // Written on one line (by this module, or compact by serde_json in older records).
        Ok(Self(raw.to_owned()))
    }

    fn one_line(raw: Box<RawValue>) -> Self {
        let text = raw.get();
        if !text.bytes().any(|b| b == b'\n' || b == b'\r') {
            return Self(raw);
        }
        let flat = text.replace(['\n', '\r'], " ");
        // Still valid: the breaks were whitespace between tokens, and so is a space.
        Self(RawValue::from_string(flat).unwrap_or(raw))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The text as serde_json's raw value, which serializes as itself inside a larger document.
    pub fn raw(&self) -> &RawValue {
        &self.0
    }

    /// The value as a tree, for the readers that need one (the admin page, the A2A edge).
    pub fn to_value(&self) -> Value {
        let mut de = serde_json::Deserializer::from_str(self.as_str());
        de.disable_recursion_limit();
        Value::deserialize(&mut de).unwrap_or(Value::Null)
    }

    /// Whether the text is a JSON object.
    pub fn is_object(&self) -> bool {
        self.as_str().starts_with('{')
    }

    /// The members of the text if it is an object (none otherwise).
    pub fn members(&self) -> Members<'_> {
        Members::of(&self.0)
    }
}

impl Default for JsonText {
    /// `null`, what a payload moved out for a tick leaves behind.
    fn default() -> Self {
        Self::null()
    }
}

impl From<Value> for JsonText {
    fn from(value: Value) -> Self {
        Self::from_value(&value)
    }
}

impl From<&Value> for JsonText {
    fn from(value: &Value) -> Self {
        Self::from_value(value)
    }
}

/// Two texts are equal when they are the same text: a payload is kept as it came, so a copy of
/// it compares equal and a re-encoding need not.
impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// By value: what the text means, whatever its spacing or member order.
impl PartialEq<Value> for JsonText {
    fn eq(&self, other: &Value) -> bool {
        self.to_value() == *other
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for JsonText {
    /// Into serde_json's serializer, the text as it is; into any other, the value it holds.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    /// Through a `Value`, so that it reads from any deserializer, including the buffered one
    /// serde uses for flattened structs (which a raw value cannot come through). The hot readers
    /// (the store's records, a trigger's body) build it from bytes instead.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(|v| Self::from_value(&v))
    }
}

/// What [`check`] found in a text serde_json accepted.
#[derive(Debug, PartialEq, Eq)]
struct Checked {
    /// Nesting of arrays and objects (a scalar is 0).
    depth: usize,
    /// Whether a line break stands between tokens (inside a string serde_json refuses one), so
    /// that only such a text is copied to put it on one line.
    breaks: bool,
}

/// What serde_json's raw value lets through but a tree refuses, looked for in text it already
/// checked, in the same pass that counts the nesting: `None` for a `\\u` escape of an unpaired
/// surrogate or a number beyond `f64`. A payload is read into a tree later (by runners, by the
/// admin page), so what a tree refuses must be refused at the door, as it was when the door
/// built one. String contents, most of a payload's bytes, are skipped to the next quote or
/// backslash by `memchr` rather than byte by byte (#16).
fn check(text: &[u8]) -> Option<Checked> {
    let (mut level, mut depth, mut breaks) = (0usize, 0usize, false);
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => i = past_string(text, i + 1)?,
            b'[' | b'{' => {
                level += 1;
                depth = depth.max(level);
                i += 1;
            }
            b']' | b'}' => {
                level = level.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let end = text[i..]
                    .iter()
                    .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .map_or(text.len(), |n| i + n);
                let number = &text[i..end];
                // Short integers always fit; anything else is read as serde_json reads a float.
                let plain =
                    number.len() <= 18 && !number.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
                if !plain {
                    let value: f64 = std::str::from_utf8(number).ok()?.parse().ok()?;
                    if !value.is_finite() {
                        return None;
                    }
                }
                i = end;
            }
            b'\n' | b'\r' => {
                breaks = true;
                i += 1;
            }
            _ => i += 1,
        }
    }
    Some(Checked { depth, breaks })
}

/// The index just past the string whose contents start at `i`, checking its `\\u` escapes:
/// a high surrogate must be followed by an escaped low one, and a low one never stands alone.
fn past_string(text: &[u8], mut i: usize) -> Option<usize> {
    let hex = |at: usize| -> Option<u16> {
        let digits = text.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    while i < text.len() {
        i += memchr::memchr2(b'"', b'\\', &text[i..])?;
        match text[i] {
            b'"' => return Some(i + 1),
            _ if text.get(i + 1) == Some(&b'u') => {
                let unit = hex(i + 2)?;
                i += 6;
                match unit {
                    0xD800..=0xDBFF => {
                        if text.get(i..i + 2) != Some(b"\\u") {
                            return None;
                        }
                        if !(0xDC00..=0xDFFF).contains(&hex(i + 2)?) {
                            return None;
                        }
                        i += 6;
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => {}
                }
            }
            _ => i += 2,
        }
    }
    Some(i)
}

/// Nesting depth of arrays and objects in a tree (`{}` is 1, a scalar 0), walked without
/// recursion so that measuring a hostile value cannot exhaust the stack: for values that arrive
/// as trees (a form's `payload` field) and the rare text [`check`] refused and a tree read.
pub fn value_depth(value: &Value) -> usize {
    let container = |v: &&Value| matches!(v, Value::Array(_) | Value::Object(_));
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = Vec::new();
    if container(&value) {
        stack.push((value, 1));
    }
    while let Some((v, level)) = stack.pop() {
        deepest = deepest.max(level);
        match v {
            Value::Array(items) => {
                stack.extend(items.iter().filter(container).map(|c| (c, level + 1)))
            }
            Value::Object(map) => {
                stack.extend(map.values().filter(container).map(|c| (c, level + 1)))
            }
            _ => {}
        }
    }
    deepest
}

/// The members of a JSON object, borrowed from its text: a lookup without a tree. Built with one
/// pass over the text; a member's own value is another raw text, looked into only if asked.
/// As with serde_json's `Map`, the last of repeated names wins.
///
/// The pass does not validate: a `RawValue` is valid JSON already (serde_json checked it when it
/// was made), so the pass only finds where each member starts and ends, skipping string contents
/// with `memchr`. Checking every value again cost a webhook request about 4.6k instructions
/// (#16); now only a value that is asked for is handed to serde_json, as a raw value of its own.
pub struct Members<'a> {
    /// The whole text, for pointers that start at its root.
    raw: &'a RawValue,
    /// Each member's name (unescaped) and the text of its value.
    list: Vec<(Cow<'a, str>, &'a str)>,
}

impl<'a> Members<'a> {
    /// The members of `raw` if it is an object; none otherwise (an array, a scalar).
    pub fn of(raw: &'a RawValue) -> Self {
        let list = if raw.get().starts_with('{') {
            scan_members(raw.get()).unwrap_or_default()
        } else {
            Vec::new()
        };
        Self { raw, list }
    }

    /// The member named `name`.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        let (_, text) = self.list.iter().rev().find(|(k, _)| k == name)?;
        // A slice of valid JSON that is one whole value: serde_json takes it as one, with the
        // recursion limit off as for the text it came from.
        let mut de = serde_json::Deserializer::from_str(text);
        de.disable_recursion_limit();
        <&RawValue>::deserialize(&mut de).ok()
    }

    /// Whether the text is an object (possibly empty).
    pub fn is_object(&self) -> bool {
        self.raw.get().starts_with('{')
    }

    /// The value at `path` of member names below this object.
    pub fn path(&self, path: &[&str]) -> Option<&'a RawValue> {
        let (first, rest) = path.split_first()?;
        let mut cur = self.get(first)?;
        for name in rest {
            cur = Members::of(cur).get(name)?;
        }
        Some(cur)
    }

    /// The value at a JSON Pointer (RFC 6901, `/a/0/b`) from the root of the text, arrays
    /// included; `""` is the whole text.
    pub fn pointer(&self, pointer: &str) -> Option<&'a RawValue> {
        if pointer.is_empty() {
            return Some(self.raw);
        }
        let mut cur = self.raw;
        for token in pointer.strip_prefix('/')?.split('/') {
            let token = token.replace("~1", "/").replace("~0", "~");
            cur = if cur.get().starts_with('[') {
                // Digits only, without a leading zero, as serde_json's `Value::pointer` reads an
                // index (`usize::from_str` alone would take `+1`).
                if token.starts_with('+') || (token.len() > 1 && token.starts_with('0')) {
                    return None;
                }
                let index: usize = token.parse().ok()?;
                let items: Vec<&RawValue> = serde_json::from_str(cur.get()).ok()?;
                *items.get(index)?
            } else {
                Members::of(cur).get(&token)?
            };
        }
        Some(cur)
    }
}

/// A string or number member as text, the way provider ids and title parts are read: a string
/// as it is (`None` when empty), a number in its JSON form; anything else is `None`.
pub fn scalar_text(raw: &RawValue) -> Option<String> {
    match serde_json::from_str::<Value>(raw.get()).ok()? {
        Value::String(s) if !s.is_empty() => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The members of the object `text` (valid JSON), as [`Members`] keeps them; `None` if it is
/// not an object after all.
fn scan_members(text: &str) -> Option<Vec<(Cow<'_, str>, &str)>> {
    let b = text.as_bytes();
    let mut i = skip_space(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_space(b, i + 1);
    let mut list = Vec::with_capacity(8);
    if b.get(i) == Some(&b'}') {
        return Some(list);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let end = string_end(b, i + 1)?;
        let quoted = &text[i..end];
        let name = if quoted.contains('\\') {
            Cow::Owned(serde_json::from_str::<String>(quoted).ok()?)
        } else {
            Cow::Borrowed(&quoted[1..quoted.len() - 1])
        };
        i = skip_space(b, end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_space(b, i + 1);
        i = value_end(b, start)?;
        list.push((name, &text[start..i]));
        i = skip_space(b, i);
        match b.get(i) {
            Some(b',') => i = skip_space(b, i + 1),
            Some(b'}') => return Some(list),
            _ => return None,
        }
    }
}

/// The first index at or after `i` that is not JSON whitespace.
fn skip_space(b: &[u8], i: usize) -> usize {
    let rest = b.get(i..).unwrap_or_default();
    i + rest
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .count()
}

/// The index just past the value of valid JSON that starts at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j + 1)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        // A number, `true`, `false` or `null`: up to the next delimiter.
        _ => Some(
            i + b[i..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(b.len() - i),
        ),
    }
}

/// The index just past the closing quote of the string whose contents start at `i`.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
    use serde_json::json;

    /// serde_json's own reading of an object's members, the oracle `scan_members` is held to.
    struct MembersVisitor;

    impl<'de> Visitor<'de> for MembersVisitor {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
            while let Some(name) = map.next_key_seed(Name)? {
                members.push((name, map.next_value::<&RawValue>()?));
            }
            Ok(members)
        }
    }

    /// A member name, borrowed from the text unless it holds escapes.
    struct Name;

    impl<'de> DeserializeSeed<'de> for Name {
        type Value = Cow<'de, str>;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for Name {
        type Value = Cow<'de, str>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a member name")
        }

        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_string()))
        }
    }

    /// The members as serde_json reads them (names and value texts), or `None` for a non-object.
    fn serde_members(text: &str) -> Option<Vec<(String, String)>> {
        let mut de = serde_json::Deserializer::from_str(text);
        de.disable_recursion_limit();
        let list = de.deserialize_map(MembersVisitor).ok()?;
        Some(
            list.into_iter()
                .map(|(k, v)| (k.into_owned(), v.get().to_string()))
                .collect(),
        )
    }

    fn nested_depth(v: &Value) -> usize {
        match v {
            Value::Array(items) => 1 + items.iter().map(nested_depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(nested_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
            // Strings made of the bytes the depth count and the line check care about.
            "[\\[\\]{}\"\\\\\n\r]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\"\\\\]{0,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn text_is_kept_without_surrounding_space_and_on_one_line() {
        let t =
            JsonText::parse_limited(b"  {\"a\": [1,\n 2],\r\n \"b\": \"x\\ny\"}\n", 64).unwrap();
        assert_eq!(t.as_str(), "{\"a\": [1,  2],   \"b\": \"x\\ny\"}");
        assert_eq!(t, json!({"a": [1, 2], "b": "x\ny"}));
        assert!(t.is_object());
    }

    #[test]
    fn bad_and_deep_texts_are_refused() {
        assert!(matches!(
            JsonText::parse_limited(b"{", 64),
            Err(TextError::Invalid(_))
        ));
        assert!(matches!(
            JsonText::parse_limited(b"1 2", 64),
            Err(TextError::Invalid(_))
        ));
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(
            JsonText::parse_limited(deep.as_bytes(), 64),
            Err(TextError::TooDeep(65))
        );
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(JsonText::parse_limited(ok.as_bytes(), 64).is_ok());
        // Far past serde_json's own limit: refused, and the stack survives.
        let hostile = "[".repeat(1 << 20);
        assert!(JsonText::parse_limited(hostile.as_bytes(), 64).is_err());
    }

    #[test]
    fn what_a_tree_refuses_is_refused_in_its_words() {
        for (text, message) in [
            (
                r#"{"a":"\ud800"}"#,
                "unexpected end of hex escape at line 1 column 13",
            ),
            (
                r#"{"a":"\udc00x"}"#,
                "lone leading surrogate in hex escape at line 1 column 12",
            ),
            (
                r#"{"a":"\ud800\u0041"}"#,
                "lone leading surrogate in hex escape at line 1 column 18",
            ),
            (r#"{"a":1e400}"#, "number out of range at line 1 column 10"),
        ] {
            assert_eq!(
                JsonText::parse_limited(text.as_bytes(), 64),
                Err(TextError::Invalid(message.to_string())),
                "{text}"
            );
        }
        let pair = JsonText::parse_limited(r#"{"a":"\ud83d\ude00","n":-1.5e300}"#.as_bytes(), 64);
        assert_eq!(pair.unwrap(), json!({"a": "\u{1F600}", "n": -1.5e300}));
    }

    #[test]
    fn members_find_names_paths_and_pointers() {
        let t = JsonText::from(json!({
            "a": {"b": [10, {"c": "deep"}]},
            "n": 7,
            "e": "",
            "we\"ird": true,
            "x/y": {"~": 1}
        }));
        let m = t.members();
        assert_eq!(m.get("n").map(RawValue::get), Some("7"));
        assert_eq!(m.get("we\"ird").map(RawValue::get), Some("true"));
        assert!(m.get("missing").is_none());
        assert_eq!(scalar_text(m.get("n").unwrap()).as_deref(), Some("7"));
        assert_eq!(scalar_text(m.get("e").unwrap()), None);
        assert_eq!(
            m.path(&["a", "b"]).map(RawValue::get),
            Some("[10,{\"c\":\"deep\"}]")
        );
        let c = t.members().pointer("/a/b/1/c").unwrap();
        assert_eq!(scalar_text(c).as_deref(), Some("deep"));
        assert_eq!(
            t.members().pointer("/x~1y/~0").map(RawValue::get),
            Some("1")
        );
        assert!(t.members().pointer("/a/b/01").is_none());
        assert!(t.members().pointer("/a/b/+1").is_none());
        assert!(t.members().pointer("a").is_none());
        assert!(JsonText::from(json!([1])).members().get("0").is_none());
        // The last of repeated names, as serde_json's Map keeps it.
        let dup = JsonText::parse_limited(br#"{"k": 1, "k": 2}"#, 64).unwrap();
        assert_eq!(dup.members().get("k").map(RawValue::get), Some("2"));
    }

    #[test]
    fn serializes_as_itself_inside_a_document_and_as_a_value_elsewhere() {
        let t = JsonText::parse_limited(br#"{"z": 1, "a": [true]}"#, 64).unwrap();
        let doc = serde_json::to_string(&json!({"x": 1})).unwrap();
        assert_eq!(doc, r#"{"x":1}"#);
        let wrapped = serde_json::to_string(&serde_json::json!({ "v": t.to_value() })).unwrap();
        assert_eq!(wrapped, r#"{"v":{"a":[true],"z":1}}"#);
        #[derive(Serialize)]
        struct Holder<'a> {
            v: &'a JsonText,
        }
        assert_eq!(
            serde_json::to_string(&Holder { v: &t }).unwrap(),
            r#"{"v":{"z": 1, "a": [true]}}"#
        );
        assert_eq!(
            serde_json::to_value(Holder { v: &t }).unwrap(),
            json!({"v": {"z": 1, "a": [true]}})
        );
        let back: JsonText = serde_json::from_str(r#" {"q": [1, 2]} "#).unwrap();
        assert_eq!(back.as_str(), r#"{"q":[1,2]}"#);
        assert_eq!(JsonText::default().as_str(), "null");
        assert_eq!(JsonText::empty_object().as_str(), "{}");
    }

    proptest! {
        /// The byte count agrees with the depth of the tree, whatever the strings hold.
        #[test]
        fn depth_counts_like_the_tree(v in arb_json()) {
            let text = serde_json::to_string(&v).unwrap();
            prop_assert_eq!(check(text.as_bytes()), Some(Checked { depth: nested_depth(&v), breaks: false }));
            let pretty_text = serde_json::to_string_pretty(&v).unwrap();
            prop_assert_eq!(
                check(pretty_text.as_bytes()).map(|c| c.depth),
                Some(nested_depth(&v))
            );
            prop_assert_eq!(value_depth(&v), nested_depth(&v));
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let t = JsonText::parse_limited(pretty.as_bytes(), 64).unwrap();
            prop_assert!(!t.as_str().contains('\n'));
            prop_assert_eq!(t.to_value(), v.clone());
            prop_assert_eq!(JsonText::from_stored(t.as_str().as_bytes()).unwrap(), t);
        }

        /// Arbitrary bytes never panic, and what is accepted reads back as the same value.
        #[test]
        fn arbitrary_bytes_are_refused_or_kept(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(t) = JsonText::parse_limited(&bytes, 64) {
                let v: Value = serde_json::from_slice(&bytes).unwrap();
                prop_assert_eq!(t.to_value(), v);
            }
        }

        /// The door accepts exactly what a tree accepts, the message included, over texts built
        /// from the pieces where a raw value and a tree disagree (surrogate escapes, numbers
        /// beyond `f64`) and the grammar around them.
        #[test]
        fn accepts_what_a_tree_accepts(pieces in prop::collection::vec(prop::sample::select(vec![
            "{", "}", "[", "]", ",", ":", "\"", "\"a\"", "\"\\ud800\"", "\"\\udc00\"",
            "\"\\ud83d\\ude00\"", "\"\\ud800\\u0041\"", "\\u0041", "\\ud800", "\\udfff", "\\\"",
            "1", "-0", "1.5", "1e400", "-1e309", "1e-400", "123456789012345678901234567890",
            "1797693134862315700000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
            "true", "null", " ", "\n", "x",
        ]), 0..14)) {
            let text = pieces.concat();
            let tree = serde_json::from_str::<Value>(&text);
            match (JsonText::parse_limited(text.as_bytes(), 64), tree) {
                (Ok(t), Ok(v)) => prop_assert_eq!(t.to_value(), v),
                (Err(TextError::Invalid(m)), Err(e)) => prop_assert_eq!(m, e.to_string()),
                (ours, theirs) => prop_assert!(false, "{text:?}: {ours:?} against {theirs:?}"),
            }
        }

        /// The scan finds the members serde_json finds, names unescaped and values as the same
        /// text, in compact and in spaced-out JSON alike; a non-object has none.
        #[test]
        fn the_scan_finds_what_serde_finds(v in arb_json(), space in "[ \t\r\n]{0,3}") {
            let compact = serde_json::to_string(&v).unwrap();
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            // Whitespace after every structural byte outside strings, as a sender may write it.
            let mut spaced = String::new();
            let mut in_string = false;
            let mut escaped = false;
            for c in compact.chars() {
                spaced.push(c);
                if in_string {
                    if escaped { escaped = false } else if c == '\\' { escaped = true } else if c == '"' { in_string = false }
                } else if c == '"' {
                    in_string = true;
                } else if matches!(c, '{' | '}' | '[' | ']' | ',' | ':') {
                    spaced.push_str(&space);
                }
            }
            for text in [&compact, &pretty, &spaced] {
                let scanned = scan_members(text).map(|list| {
                    list.into_iter().map(|(k, v)| (k.into_owned(), v.to_string())).collect::<Vec<_>>()
                });
                prop_assert_eq!(scanned, serde_members(text), "{}", text);
            }
        }

        /// Every top-level member is found by name and by pointer, with the value it has.
        #[test]
        fn members_agree_with_the_tree(v in arb_json()) {
            let t = JsonText::from(&v);
            if let Value::Object(map) = &v {
                for (k, val) in map {
                    let raw = t.members().get(k).unwrap();
                    prop_assert_eq!(&serde_json::from_str::<Value>(raw.get()).unwrap(), val);
                    let pointer = format!("/{}", k.replace('~', "~0").replace('/', "~1"));
                    let by_pointer = t.members().pointer(&pointer).unwrap();
                    prop_assert_eq!(&serde_json::from_str::<Value>(by_pointer.get()).unwrap(), val);
                }
            }
        }
    }
}
