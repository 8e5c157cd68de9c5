//! The event as its schema sees it, read in place from the JSON text that is published.
//!
//! `journal!` used to build a `serde_json::Value` of each event for its schema: every member
//! name and string copied into a map (an index map hashing each name when `serde_json`'s
//! `preserve_order` is on, as any dependency may ask; the AWS SDK's test utilities do), then
//! dropped. That was 13–22 % of a commit's client instructions. Here the text is scanned once
//! into a flat list of items borrowing from it: nothing is copied or hashed. Only the fast
//! "is it valid?" question is asked of it; a failure is reported from a `serde_json::Value` as
//! before, so error messages do not change.
//!
//! Numbers read as `serde_json` reads them (`serde_json::Number`), and the schema sees the
//! number as it is written in the published text, whatever the Rust type was (an `f32` of 0.1
//! is `0.1`, as a consumer reads it).

use std::borrow::Cow;

use jsonschema::JsonType;
use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use serde_json::Value;

/// The most containers `serde_json` nests when it parses (its recursion limit of 128 refuses
/// the 128th): deeper text takes the slow path, whose parse reports it.
const MAX_DEPTH: usize = 127;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Null,
    False,
    True,
    Number,
    String,
    Object,
    Array,
}

/// One value of the document, in document order (a container's first child follows it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Item<'t> {
    kind: Kind,
    /// A string's text between its quotes, escapes as written; a number's literal.
    raw: &'t str,
    /// The member name this item is the value of, between its quotes (never with an escape:
    /// the scanner leaves such text to serde_json).
    name: &'t str,
    raw_escaped: bool,
    /// A container's children.
    len: u32,
    /// The next sibling's index; 0 for none (the root is no one's sibling).
    next: u32,
}

impl<'t> Item<'t> {
    fn new(kind: Kind) -> Self {
        Item {
            kind,
            raw: "",
            name: "",
            raw_escaped: false,
            len: 0,
            next: 0,
        }
    }
}

/// JSON text scanned into items that borrow from it.
#[derive(Debug)]
pub(crate) struct Document<'t> {
    items: Vec<Item<'t>>,
}

impl<'t> Document<'t> {
    /// Scans `text`, JSON that `serde_json` wrote (or checked, for a raw value). `None` for
    /// anything this scanner does not take as it is — malformed text, nesting deeper than
    /// `serde_json` parses, a number beyond `f64` — which the caller hands to `serde_json`.
    pub(crate) fn parse(text: &'t str) -> Option<Self> {
        let mut scanner = Scanner {
            text,
            at: 0,
            items: Vec::with_capacity(16),
        };
        scanner.value(0)?;
        scanner.skip_space();
        (scanner.at == text.len()).then_some(Document {
            items: scanner.items,
        })
    }

    /// The root.
    pub(crate) fn root(&self) -> TextNode<'_> {
        TextNode {
            items: &self.items,
            at: 0,
        }
    }

    /// Whether the root object has a member named `name`.
    pub(crate) fn root_has(&self, name: &str) -> bool {
        self.root().children().any(|node| node.item().name == name)
    }

    /// Adds a member `name` (no escapes) holding the number `literal` to the root object.
    pub(crate) fn push_root_number(&mut self, name: &'t str, literal: &'t str) {
        if self.items.first().map(|root| root.kind) != Some(Kind::Object) {
            return;
        }
        let index = self.items.len() as u32;
        let mut item = Item::new(Kind::Number);
        item.raw = literal;
        item.name = name;
        if self.items[0].len > 0 {
            let mut last = 1usize;
            while self.items[last].next != 0 {
                last = self.items[last].next as usize;
            }
            self.items[last].next = index;
        } else if index != 1 {
            // An empty root has no child at 1 to hold the member: not a document of ours.
            return;
        }
        self.items[0].len += 1;
        self.items.push(item);
    }
}

struct Scanner<'t> {
    text: &'t str,
    at: usize,
    items: Vec<Item<'t>>,
}

impl<'t> Scanner<'t> {
    fn skip_space(&mut self) {
        let bytes = self.text.as_bytes();
        while self.at < bytes.len() && matches!(bytes[self.at], b' ' | b'\n' | b'\r' | b'\t') {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// At a `"`: the text up to the closing quote, and whether it holds an escape. (The text
    /// is JSON, so a string holds no raw control character to look for.)
    fn string(&mut self) -> Option<(&'t str, bool)> {
        let bytes = self.text.as_bytes();
        let start = self.at + 1;
        let mut i = start;
        let mut escaped = false;
        loop {
            i += memchr::memchr2(b'"', b'\\', bytes.get(i..)?)?;
            if bytes[i] == b'"' {
                self.at = i + 1;
                return Some((self.text.get(start..i)?, escaped));
            }
            escaped = true;
            i += 2;
        }
    }

    fn literal(&mut self, word: &str, kind: Kind) -> Option<u32> {
        self.text[self.at..].starts_with(word).then_some(())?;
        self.at += word.len();
        Some(self.push(Item::new(kind)))
    }

    fn push(&mut self, item: Item<'t>) -> u32 {
        self.items.push(item);
        (self.items.len() - 1) as u32
    }

    /// One value, at `depth` containers deep; its index.
    fn value(&mut self, depth: usize) -> Option<u32> {
        self.skip_space();
        match self.peek()? {
            b'{' | b'[' if depth >= MAX_DEPTH => None,
            b'{' => self.container(Kind::Object, b'}', depth),
            b'[' => self.container(Kind::Array, b']', depth),
            b'"' => {
                let (raw, escaped) = self.string()?;
                // A lone surrogate (`\ud800`) passes serde_json's check of a raw value but not
                // its parse: the slow path reports it.
                if escaped {
                    try_unescape(raw)?;
                }
                let mut item = Item::new(Kind::String);
                item.raw = raw;
                item.raw_escaped = escaped;
                Some(self.push(item))
            }
            b't' => self.literal("true", Kind::True),
            b'f' => self.literal("false", Kind::False),
            b'n' => self.literal("null", Kind::Null),
            b'-' | b'0'..=b'9' => {
                let bytes = self.text.as_bytes();
                let start = self.at;
                while self.at < bytes.len()
                    && matches!(
                        bytes[self.at],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.at += 1;
                }
                let raw = &self.text[start..self.at];
                parse_number(raw)?;
                let mut item = Item::new(Kind::Number);
                item.raw = raw;
                Some(self.push(item))
            }
            _ => None,
        }
    }

    fn container(&mut self, kind: Kind, close: u8, depth: usize) -> Option<u32> {
        let index = self.push(Item::new(kind));
        self.at += 1;
        self.skip_space();
        if self.peek()? == close {
            self.at += 1;
            return Some(index);
        }
        let mut previous: Option<u32> = None;
        let mut len = 0u32;
        loop {
            let mut name = None;
            if kind == Kind::Object {
                self.skip_space();
                if self.peek()? != b'"' {
                    return None;
                }
                let (n, escaped) = self.string()?;
                // Names with escapes are rare (serde_json escapes only quotes, backslashes and
                // control characters): the slow path compares them unescaped.
                if escaped {
                    return None;
                }
                name = Some(n);
                self.skip_space();
                if self.peek()? != b':' {
                    return None;
                }
                self.at += 1;
            }
            let child = self.value(depth + 1)?;
            if let Some(n) = name {
                self.items[child as usize].name = n;
            }
            if let Some(previous) = previous {
                self.items[previous as usize].next = child;
            }
            previous = Some(child);
            len += 1;
            self.skip_space();
            match self.peek()? {
                b',' => self.at += 1,
                byte if byte == close => {
                    self.at += 1;
                    break;
                }
                _ => return None,
            }
        }
        self.items[index as usize].len = len;
        if kind == Kind::Object && self.repeats_a_name(index) {
            // serde_json keeps the last of a repeated name, and counts it once: the slow path.
            return None;
        }
        Some(index)
    }

    /// Whether two members of the object at `index` share a name.
    fn repeats_a_name(&self, index: u32) -> bool {
        let node = TextNode {
            items: &self.items,
            at: index,
        };
        if node.item().len <= 32 {
            let mut names = node.children();
            while let Some(first) = names.next() {
                let name = first.item().name;
                if names.clone().any(|later| later.item().name == name) {
                    return true;
                }
            }
            false
        } else {
            let mut seen = std::collections::HashSet::with_capacity(node.item().len as usize);
            !node.children().all(|child| seen.insert(child.item().name))
        }
    }
}

/// A number literal as `serde_json` reads it: small integers directly, the rest through
/// `serde_json` itself. `None` for what it refuses (beyond `f64`) or a malformed literal.
fn parse_number(raw: &str) -> Option<serde_json::Number> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    let plain = !digits.is_empty()
        && digits.len() <= 18
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if plain {
        let n: u64 = digits.parse().ok()?;
        if raw.starts_with('-') {
            // `-0` is a float to serde_json.
            if n != 0 {
                return Some(serde_json::Number::from(-(n as i64)));
            }
        } else {
            return Some(serde_json::Number::from(n));
        }
    }
    serde_json::from_str(raw).ok()
}

/// Unescapes a JSON string's inner text; `None` for an escape serde_json does not take.
fn try_unescape(raw: &str) -> Option<String> {
    serde_json::from_str(&format!("\"{raw}\"")).ok()
}

/// Unescapes a JSON string's inner text that [`Scanner`] took (so it unescapes).
fn unescape(raw: &str) -> String {
    try_unescape(raw).unwrap_or_else(|| raw.to_owned())
}

fn text<'a>(raw: &'a str, escaped: bool) -> Cow<'a, str> {
    if escaped {
        Cow::Owned(unescape(raw))
    } else {
        Cow::Borrowed(raw)
    }
}

/// The representation the schemas validate on the hot path.
pub(crate) struct TextJson;

impl Json for TextJson {
    type Node<'a> = TextNode<'a>;
    type PreparedKey = String;
    type StringBuffer = ();

    // A lookup is a scan of the members: a members pass is never dearer than a few lookups.
    const KEYS_PER_LOOKUP: usize = 64;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> String {
        key.to_owned()
    }

    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(TextNode<'_>) -> T) -> T {
        let mut item = Item::new(Kind::String);
        item.raw = string;
        let items = [item];
        f(TextNode {
            items: &items,
            at: 0,
        })
    }
}

/// A value of a [`Document`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct TextNode<'a> {
    items: &'a [Item<'a>],
    at: u32,
}

impl<'a> TextNode<'a> {
    fn item(&self) -> &'a Item<'a> {
        &self.items[self.at as usize]
    }

    /// The children of a container, in order.
    fn children(&self) -> Children<'a> {
        let item = self.item();
        Children {
            items: self.items,
            at: if item.len > 0 { self.at + 1 } else { 0 },
            left: item.len,
        }
    }
}

/// The children of a container.
#[derive(Clone)]
pub(crate) struct Children<'a> {
    items: &'a [Item<'a>],
    at: u32,
    left: u32,
}

impl<'a> Iterator for Children<'a> {
    type Item = TextNode<'a>;

    fn next(&mut self) -> Option<TextNode<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let node = TextNode {
            items: self.items,
            at: self.at,
        };
        self.at = self.items[self.at as usize].next;
        Some(node)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

/// An object's members: (name, value).
pub(crate) struct Members<'a>(Children<'a>);

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, TextNode<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let node = self.0.next()?;
        Some((node.item().name, node))
    }
}

impl<'a> Node<'a, TextJson> for TextNode<'a> {
    type Object = TextObject<'a>;
    type Array = TextArray<'a>;
    type Number = serde_json::Number;

    fn as_object(&self) -> Option<TextObject<'a>> {
        (self.item().kind == Kind::Object).then_some(TextObject(*self))
    }

    fn as_array(&self) -> Option<TextArray<'a>> {
        (self.item().kind == Kind::Array).then_some(TextArray(*self))
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        let item = self.item();
        (item.kind == Kind::String).then(|| text(item.raw, item.raw_escaped))
    }

    fn as_number(&self) -> Option<serde_json::Number> {
        let item = self.item();
        if item.kind == Kind::Number {
            parse_number(item.raw)
        } else {
            None
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self.item().kind {
            Kind::True => Some(true),
            Kind::False => Some(false),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        self.item().kind == Kind::Null
    }

    fn is_number(&self) -> bool {
        self.item().kind == Kind::Number
    }

    fn is_string(&self) -> bool {
        self.item().kind == Kind::String
    }

    fn json_type(&self) -> JsonType {
        match self.item().kind {
            Kind::Null => JsonType::Null,
            Kind::False | Kind::True => JsonType::Boolean,
            Kind::Number => JsonType::Number,
            Kind::String => JsonType::String,
            Kind::Object => JsonType::Object,
            Kind::Array => JsonType::Array,
        }
    }

    fn to_value(&self) -> Cow<'a, Value> {
        Cow::Owned(to_value(*self))
    }

    fn identity(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity::tagged(self.items.as_ptr() as usize, self.at))
    }
}

/// The node as a `serde_json::Value` (for error messages and `const`/`enum` comparisons).
fn to_value(node: TextNode<'_>) -> Value {
    let item = node.item();
    match item.kind {
        Kind::Null => Value::Null,
        Kind::False => Value::Bool(false),
        Kind::True => Value::Bool(true),
        Kind::Number => parse_number(item.raw).map_or(Value::Null, Value::Number),
        Kind::String => Value::String(text(item.raw, item.raw_escaped).into_owned()),
        Kind::Array => Value::Array(node.children().map(to_value).collect()),
        Kind::Object => Value::Object(
            Members(node.children())
                .map(|(name, value)| (name.to_owned(), to_value(value)))
                .collect(),
        ),
    }
}

/// An object node.
pub(crate) struct TextObject<'a>(TextNode<'a>);

impl<'a> Object<'a, TextJson> for TextObject<'a> {
    type Node = TextNode<'a>;
    type MemberName = &'a str;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        self.0.item().len as usize
    }

    /// The member of that name (there is one at most: the scanner leaves an object that
    /// repeats a name to serde_json).
    fn get(&self, key: &String) -> Option<TextNode<'a>> {
        self.0.children().find(|node| node.item().name == key)
    }

    fn members(&self) -> Members<'a> {
        Members(self.0.children())
    }
}

/// An array node.
pub(crate) struct TextArray<'a>(TextNode<'a>);

impl<'a> Array<'a, TextJson> for TextArray<'a> {
    type Node = TextNode<'a>;
    type ElementsIter = Children<'a>;

    fn len(&self) -> usize {
        self.0.item().len as usize
    }

    fn elements(&self) -> Children<'a> {
        self.0.children()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meets_the_validators_contract() {
        let text = serde_json::to_string(&jsonschema::json::conformance::document()).unwrap();
        let document = Document::parse(&text).expect("parses");
        jsonschema::json::conformance::assert_conformance::<TextJson>(&document.root());
    }

    #[test]
    fn reads_back_what_serde_json_reads() {
        for text in [
            r#"{"a":1,"b":[true,false,null,{"c":"d\"e\u00e9\ud83d\ude00"}],"e":-2.5e3,"f":{},"g":[]}"#,
            r#"[1, 2 , "x" ,{ "y" : [ ] } ]"#,
            r#"{"big":18446744073709551615,"bigger":18446744073709551616,"neg":-9223372036854775808,"z":-0,"f":0.1}"#,
            r#""just a string""#,
            "3",
        ] {
            let document = Document::parse(text).unwrap_or_else(|| panic!("{text} parses"));
            let expected: Value = serde_json::from_str(text).unwrap();
            assert_eq!(to_value(document.root()), expected, "{text}");
        }
    }

    #[test]
    fn leaves_to_serde_json_what_it_does_not_take() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let shallow = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(Document::parse(&shallow).is_some());
        assert!(serde_json::from_str::<Value>(&shallow).is_ok());
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        // serde_json keeps the last of a repeated name and counts it once; its raw values take
        // a lone surrogate that its parse refuses.
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        let repeated_late = format!("{{{},\"k3\":0}}", many.join(","));
        assert!(Document::parse(&format!("{{{}}}", many.join(","))).is_some());
        for text in [
            r#"{"dup":1,"dup":2}"#,
            r#"{"a":{"b":1,"c":2,"b":3}}"#,
            repeated_late.as_str(),
            r#"{"a":"\ud800"}"#,
            r#"{"a\n":1}"#,
            deep.as_str(),
            "{\"a\":1e400}",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "[1 2]",
            "{\"a\":tru}",
            "{\"a\":\"unterminated}",
            "{\"a\":1} x",
            "{\"a\":01}",
            "",
        ] {
            assert!(Document::parse(text).is_none(), "{text:?}");
        }
    }

    #[test]
    fn a_member_added_to_the_root_is_seen_last() {
        for text in [r#"{"a":1}"#, "{}", r#"{"a":{"b":[1]},"c":2}"#] {
            let mut document = Document::parse(text).unwrap();
            document.push_root_number("sequence", "1");
            let mut expected: Value = serde_json::from_str(text).unwrap();
            expected["sequence"] = 1.into();
            assert_eq!(to_value(document.root()), expected);
            assert!(document.root_has("sequence"));
        }
    }

    #[test]
    fn validates_as_serde_json_values_do() {
        let schema = serde_json::json!({
            "type": "object",
            "required": ["n", "s"],
            "properties": {
                "n": {"type": "integer", "maximum": 10},
                "f": {"type": "number", "maximum": 0.1},
                "s": {"type": "string", "maxLength": 3, "pattern": "^[a-zé]+$"},
                "e": {"enum": [1.0, "x"]},
                "u": {"type": "array", "uniqueItems": true},
                "o": {"type": "object", "additionalProperties": false, "properties": {"k": {}}},
            },
        });
        let fast = jsonschema::options_for::<TextJson>()
            .build(&schema)
            .unwrap();
        let full = jsonschema::validator_for(&schema).unwrap();
        for text in [
            r#"{"n":1,"s":"abc"}"#,
            r#"{"n":11,"s":"abc"}"#,
            r#"{"n":1.5,"s":"abc"}"#,
            r#"{"n":1.0,"s":"abc"}"#,
            r#"{"n":1,"s":"abcd"}"#,
            r#"{"n":1,"s":"éé\u00e9"}"#,
            r#"{"n":1,"s":"a\"b"}"#,
            r#"{"n":1}"#,
            r#"{"n":1,"s":"a","f":0.1}"#,
            r#"{"n":1,"s":"a","f":0.10000000149011612}"#,
            r#"{"n":1,"s":"a","e":1}"#,
            r#"{"n":1,"s":"a","e":2}"#,
            r#"{"n":1,"s":"a","u":[1,{"a":1},{"a":1}]}"#,
            r#"{"n":1,"s":"a","u":[1,{"a":1},{"a":2}]}"#,
            r#"{"n":1,"s":"a","o":{"k":1}}"#,
            r#"{"n":1,"s":"a","o":{"k":1,"l":2}}"#,
            r#"[]"#,
        ] {
            let document = Document::parse(text).unwrap();
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(
                fast.is_valid(document.root()),
                full.is_valid(&value),
                "{text}"
            );
        }
    }

    fn random_value(rng: &mut fastrand::Rng, depth: usize) -> Value {
        let leaf = depth >= 3 || rng.u8(0..4) == 0;
        match if leaf { rng.u8(0..4) } else { rng.u8(0..6) } {
            0 => [Value::Null, Value::Bool(true), Value::Bool(false)][rng.usize(0..3)].clone(),
            1 => {
                let numbers = [
                    "0",
                    "1",
                    "2",
                    "3",
                    "-1",
                    "-7",
                    "10",
                    "12",
                    "18446744073709551615",
                    "-9223372036854775808",
                    "0.5",
                    "1.5",
                    "2.0",
                    "-0.0",
                    "0.1",
                    "1e300",
                    "-2.5",
                    "0.30000000000000004",
                    "4.0",
                    "9007199254740993",
                ];
                serde_json::from_str(numbers[rng.usize(0..numbers.len())]).unwrap()
            }
            2 | 3 => {
                let strings = [
                    "", "a", "ab", "abc", "é", "😀x", "a\"b", "\n", "123", "abcdef", "Ab",
                ];
                Value::String(strings[rng.usize(0..strings.len())].to_owned())
            }
            4 => Value::Array(
                (0..rng.usize(0..5))
                    .map(|_| random_value(rng, depth + 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.usize(0..5))
                    .map(|_| {
                        let names = ["a", "b", "c", "n", "s", "x1"];
                        (
                            names[rng.usize(0..names.len())].to_owned(),
                            random_value(rng, depth + 1),
                        )
                    })
                    .collect(),
            ),
        }
    }

    /// The fast reader and serde_json's values get the same verdict from many schemas, in
    /// Draft 4 (journaled's default) and the latest draft, on thousands of generated documents.
    #[test]
    fn agrees_with_serde_json_values_on_generated_documents() {
        let common = [
            r#"{"type": "integer"}"#,
            r#"{"type": ["number", "string"]}"#,
            r#"{"type": "object", "required": ["a", "n"]}"#,
            r#"{"minimum": 1, "maximum": 10}"#,
            r#"{"multipleOf": 0.5}"#,
            r#"{"multipleOf": 3}"#,
            r#"{"minLength": 2, "maxLength": 3}"#,
            r#"{"pattern": "^[a-z]+$"}"#,
            r#"{"enum": [1, 2.0, "a", null, [1], {"a": 1}]}"#,
            r#"{"minItems": 1, "maxItems": 3, "uniqueItems": true}"#,
            r#"{"items": {"type": "number"}}"#,
            r#"{"items": [{"type": "string"}, {"type": "integer"}]}"#,
            r#"{"properties": {"a": {"type": "string"}, "n": {"maximum": 2}}, "additionalProperties": false}"#,
            r#"{"patternProperties": {"^x": {"type": "null"}}, "additionalProperties": {"type": "boolean"}}"#,
            r#"{"minProperties": 2, "maxProperties": 3}"#,
            r#"{"dependencies": {"a": ["b"], "n": {"required": ["s"]}}}"#,
            r#"{"allOf": [{"type": "object"}, {"not": {"required": ["c"]}}]}"#,
            r#"{"anyOf": [{"type": "string", "maxLength": 1}, {"type": "array", "items": {"type": "object"}}]}"#,
            r#"{"oneOf": [{"type": "integer"}, {"minimum": 2}]}"#,
            r##"{"definitions": {"pos": {"minimum": 0}}, "properties": {"n": {"$ref": "#/definitions/pos"}, "a": {"items": {"$ref": "#/definitions/pos"}}}}"##,
            r#"{"properties": {"a": {"type": "array", "uniqueItems": true, "items": {"properties": {"b": {"type": "number"}}}}}}"#,
        ];
        let latest_only = [
            r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "const": 2}"#,
            r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "contains": {"type": "integer"}, "minContains": 2}"#,
            r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "propertyNames": {"maxLength": 1}}"#,
            r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "exclusiveMinimum": 0, "exclusiveMaximum": 3}"#,
            r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "if": {"required": ["a"]}, "then": {"required": ["b"]}, "else": {"maxProperties": 1}}"#,
            r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}}"#,
            r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "unevaluatedProperties": false, "properties": {"a": true}}"#,
            r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "integer", "maximum": 3}"#,
        ];
        let mut pairs = Vec::new();
        for text in common.iter().chain(&latest_only) {
            let schema: Value = serde_json::from_str(text).unwrap();
            let draft4 = schema.get("$schema").is_none();
            let mut fast = jsonschema::options_for::<TextJson>();
            let mut full = jsonschema::options();
            if draft4 {
                fast = fast.with_draft(jsonschema::Draft::Draft4);
                full = full.with_draft(jsonschema::Draft::Draft4);
            }
            pairs.push((
                *text,
                fast.build(&schema).unwrap(),
                full.build(&schema).unwrap(),
            ));
        }
        let mut rng = fastrand::Rng::with_seed(20_261_126);
        let mut failures = Vec::new();
        let mut verdicts = vec![[0usize; 2]; pairs.len()];
        for _ in 0..4_000 {
            let text = serde_json::to_string(&random_value(&mut rng, 0)).unwrap();
            let Some(document) = Document::parse(&text) else {
                assert!(
                    text.contains('\\'),
                    "only escaped names are refused here: {text}"
                );
                continue;
            };
            let value: Value = serde_json::from_str(&text).unwrap();
            for (k, (schema, fast, full)) in pairs.iter().enumerate() {
                let verdict = full.is_valid(&value);
                verdicts[k][usize::from(verdict)] += 1;
                if fast.is_valid(document.root()) != verdict {
                    failures.push(format!("{schema} on {text}"));
                }
            }
        }
        for ((schema, _, _), [invalid, valid]) in pairs.iter().zip(&verdicts) {
            assert!(
                *invalid > 10 && *valid > 10,
                "{schema}: {valid} valid, {invalid} invalid: the documents do not exercise it"
            );
        }
        assert!(
            failures.is_empty(),
            "{} disagreements, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
}
