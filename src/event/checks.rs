//! Checks made on an event before it is serialized: numbers JSON cannot represent, and nesting
//! too deep to serialize, parse and validate safely.
//!
//! serde_json writes a NaN or an infinite float as `null` without a word, so a field the schema
//! does not type would be published changed; and it recurses once per level of nesting, so an
//! event nested thousands of levels deep overflows the stack inside `journal!`. A serializer
//! that writes nothing walks the event first, with a bounded depth, and says where it found
//! either problem.

use serde::Serialize;
use serde::ser::{self, Impossible};

/// The deepest nesting of objects and arrays an event may have, the event itself being the
/// first level (serde_json refuses to parse beyond 128).
pub const MAX_NESTING_DEPTH: usize = 100;

/// What the walk found.
#[derive(Debug)]
pub(crate) enum Found {
    /// A NaN or infinite float, at this JSON pointer.
    NonFinite(String),
    /// Nesting deeper than [`MAX_NESTING_DEPTH`], at this JSON pointer.
    TooDeep(String),
    /// The type's own `Serialize` failed: serializing it for real will say why.
    Other,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::NonFinite(at) => write!(f, "a non-finite number at {at}"),
            Found::TooDeep(at) => write!(f, "nesting too deep at {at}"),
            Found::Other => f.write_str("the type failed to serialize"),
        }
    }
}

impl std::error::Error for Found {}

impl ser::Error for Found {
    fn custom<T: std::fmt::Display>(_msg: T) -> Self {
        Found::Other
    }
}

/// Walks `value` as serde_json would write it; `Ok` when every number is finite and the
/// nesting stays within [`MAX_NESTING_DEPTH`].
pub(crate) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), Found> {
    let mut walker = Walker {
        depth: 0,
        path: Vec::new(),
        indexes: Vec::new(),
        key: None,
    };
    value.serialize(&mut walker)
}

/// One step of the path to where the walk is: names are only written out for an error's
/// pointer, so a field costs no allocation.
enum Step {
    Name(&'static str),
    Index(usize),
    Key(String),
}

struct Walker {
    depth: usize,
    path: Vec<Step>,
    indexes: Vec<usize>,
    key: Option<String>,
}

impl Walker {
    fn pointer(&self) -> String {
        if self.path.is_empty() {
            return "/".to_owned();
        }
        self.path
            .iter()
            .map(|step| {
                let name = match step {
                    Step::Name(name) => (*name).to_owned(),
                    Step::Index(index) => index.to_string(),
                    Step::Key(key) => key.clone(),
                };
                format!("/{}", name.replace('~', "~0").replace('/', "~1"))
            })
            .collect()
    }

    fn enter(&mut self, levels: usize) -> Result<(), Found> {
        self.depth += levels;
        if self.depth > MAX_NESTING_DEPTH {
            return Err(Found::TooDeep(self.pointer()));
        }
        self.indexes.push(0);
        Ok(())
    }

    fn leave(&mut self, levels: usize) {
        self.depth -= levels;
        self.indexes.pop();
    }

    fn float(&self, finite: bool) -> Result<(), Found> {
        if finite {
            Ok(())
        } else {
            Err(Found::NonFinite(self.pointer()))
        }
    }

    fn within<T: Serialize + ?Sized>(&mut self, step: Step, value: &T) -> Result<(), Found> {
        self.path.push(step);
        let result = value.serialize(&mut *self);
        self.path.pop();
        result
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        let index = self.indexes.last_mut().map_or(0, |i| {
            *i += 1;
            *i - 1
        });
        self.within(Step::Index(index), value)
    }
}

impl ser::Serializer for &mut Walker {
    type Ok = ();
    type Error = Found;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, _v: bool) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i8(self, _v: i8) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i16(self, _v: i16) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i32(self, _v: i32) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i64(self, _v: i64) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_i128(self, _v: i128) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u8(self, _v: u8) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u16(self, _v: u16) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u32(self, _v: u32) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u64(self, _v: u64) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_u128(self, _v: u128) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), Found> {
        self.float(v.is_finite())
    }
    fn serialize_f64(self, v: f64) -> Result<(), Found> {
        self.float(v.is_finite())
    }
    fn serialize_char(self, _v: char) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_str(self, _v: &str) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<(), Found> {
        // An array of numbers, one level.
        self.enter(1)?;
        self.leave(1);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Found> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
    ) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        // `{"Variant": value}`
        self.enter(1)?;
        let result = self.within(Step::Name(variant), value);
        self.leave(1);
        result
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self, Found> {
        self.enter(1)?;
        Ok(self)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self, Found> {
        self.enter(1)?;
        Ok(self)
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self, Found> {
        self.enter(1)?;
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, Found> {
        // `{"Variant": [...]}`
        self.path.push(Step::Name(variant));
        self.enter(2)?;
        Ok(self)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self, Found> {
        self.enter(1)?;
        Ok(self)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self, Found> {
        self.enter(1)?;
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, Found> {
        // `{"Variant": {...}}`
        self.path.push(Step::Name(variant));
        self.enter(2)?;
        Ok(self)
    }
}

impl ser::SerializeSeq for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        self.element(value)
    }
    fn end(self) -> Result<(), Found> {
        self.leave(1);
        Ok(())
    }
}

impl ser::SerializeTuple for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        self.element(value)
    }
    fn end(self) -> Result<(), Found> {
        self.leave(1);
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        self.element(value)
    }
    fn end(self) -> Result<(), Found> {
        self.leave(1);
        Ok(())
    }
}

impl ser::SerializeTupleVariant for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        self.element(value)
    }
    fn end(self) -> Result<(), Found> {
        self.leave(2);
        self.path.pop();
        Ok(())
    }
}

impl ser::SerializeMap for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Found> {
        self.key = Some(key.serialize(KeyName).unwrap_or_else(|_| "?".to_owned()));
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Found> {
        let key = self.key.take().unwrap_or_else(|| "?".to_owned());
        self.within(Step::Key(key), value)
    }
    fn end(self) -> Result<(), Found> {
        self.leave(1);
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        self.within(Step::Name(key), value)
    }
    fn end(self) -> Result<(), Found> {
        self.leave(1);
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Walker {
    type Ok = ();
    type Error = Found;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Found> {
        self.within(Step::Name(key), value)
    }
    fn end(self) -> Result<(), Found> {
        self.leave(2);
        self.path.pop();
        Ok(())
    }
}

/// A map key as text, for the pointer; keys that are not scalars are shown as `?`.
struct KeyName;

macro_rules! key_to_string {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<String, Found> {
            Ok(v.to_string())
        })*
    };
}

impl ser::Serializer for KeyName {
    type Ok = String;
    type Error = Found;
    type SerializeSeq = Impossible<String, Found>;
    type SerializeTuple = Impossible<String, Found>;
    type SerializeTupleStruct = Impossible<String, Found>;
    type SerializeTupleVariant = Impossible<String, Found>;
    type SerializeMap = Impossible<String, Found>;
    type SerializeStruct = Impossible<String, Found>;
    type SerializeStructVariant = Impossible<String, Found>;

    key_to_string!(
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
        serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_f32: f32,
        serialize_f64: f64, serialize_char: char, serialize_str: &str,
    );

    fn serialize_bytes(self, _v: &[u8]) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_none(self) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<String, Found> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, Found> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<String, Found> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, Found> {
        Err(Found::Other)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Found> {
        Err(Found::Other)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Found> {
        Err(Found::Other)
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, Found> {
        Err(Found::Other)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Found> {
        Err(Found::Other)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Found> {
        Err(Found::Other)
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, Found> {
        Err(Found::Other)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Found> {
        Err(Found::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    struct Reading {
        name: &'static str,
        values: Vec<f64>,
        extra: BTreeMap<String, f32>,
    }

    #[test]
    fn non_finite_numbers_are_found_with_their_place() {
        let ok = Reading {
            name: "a/b",
            values: vec![1.0, -2.5],
            extra: BTreeMap::from([("k".to_owned(), 0.5)]),
        };
        assert!(check(&ok).is_ok());
        for (values, extra, at) in [
            (vec![1.0, f64::NAN], 0.0, "/values/1"),
            (vec![f64::INFINITY], 0.0, "/values/0"),
            (vec![], f32::NEG_INFINITY, "/extra/a~1b"),
        ] {
            let reading = Reading {
                name: "n",
                values,
                extra: BTreeMap::from([("a/b".to_owned(), extra)]),
            };
            match check(&reading) {
                Err(Found::NonFinite(pointer)) => assert_eq!(pointer, at),
                other => panic!("{other:?}"),
            }
        }
    }

    /// Nested `levels` arrays deep, without building them.
    struct Nest(usize);

    impl Serialize for Nest {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = s.serialize_seq(Some(1))?;
            if self.0 > 1 {
                seq.serialize_element(&Nest(self.0 - 1))?;
            }
            seq.end()
        }
    }

    #[test]
    fn nesting_is_bounded_without_recursing_further() {
        assert!(check(&Nest(MAX_NESTING_DEPTH)).is_ok());
        assert!(matches!(
            check(&Nest(MAX_NESTING_DEPTH + 1)),
            Err(Found::TooDeep(_))
        ));
        // Deep enough to overflow the stack if it were walked (or serialized) to the end.
        assert!(matches!(check(&Nest(1_000_000)), Err(Found::TooDeep(_))));
    }
}
