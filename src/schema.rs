//! The schema registry: finds `<event_type>.json`, compiles it once, and validates events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use jsonschema::{Draft, Validator};
use serde_json::Value;

use crate::error::{JournalError, Violation};
use crate::event::instance::{Document, TextJson};

/// Schemas that ship with the crate; they are searched before any folder.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "base_event",
        include_str!("../journaled_schemas/base_event.json"),
    ),
    (
        "tagged_event",
        include_str!("../journaled_schemas/tagged_event.json"),
    ),
    (
        "journaled_audit_log_event",
        include_str!("../journaled_schemas/journaled_audit_log_event.json"),
    ),
    (
        "journaled_change",
        include_str!("../journaled_schemas/journaled_change.json"),
    ),
];

/// One schema, compiled for both representations of an event: the text `journal!` reads in
/// place (the fast check) and a `serde_json::Value` (the public API and every error report).
struct Compiled {
    full: Validator,
    fast: Validator<TextJson>,
}

/// A schema lookup, remembered.
#[derive(Clone)]
enum Cached {
    Ready(Arc<Compiled>),
    Missing(Arc<[PathBuf]>),
    Invalid { path: Arc<str>, message: Arc<str> },
}

/// What [`SchemaRegistry::check`] found for one schema file.
#[derive(Debug)]
pub struct CheckedSchema {
    /// The file, or `<built-in>/name.json`.
    pub path: PathBuf,
    /// `None` when it compiled; the problem otherwise.
    pub error: Option<JournalError>,
}

/// Loads and compiles schemas once, then validates events against them.
///
/// Search order: the crate's built-in schemas, then each configured root in order; the first
/// file found wins. A schema without `$schema` is read as Draft 4, as the reference gem does.
pub struct SchemaRegistry {
    roots: Vec<PathBuf>,
    base: Validator,
    tagged: Validator,
    compiled: RwLock<HashMap<String, Cached>>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

fn compile(event_type: &str, path: &str, text: &str) -> Result<Compiled, JournalError> {
    let invalid = |message: String| JournalError::InvalidSchema {
        event_type: event_type.to_owned(),
        path: path.to_owned(),
        message,
    };
    let schema: Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    Ok(Compiled {
        full: build(jsonschema::options(), &schema).map_err(invalid)?,
        fast: build(jsonschema::options_for::<TextJson>(), &schema).map_err(invalid)?,
    })
}

/// A validator for `schema` (read as Draft 4 when it names no `$schema`, as the reference gem
/// does), or why it does not compile.
fn build<F: jsonschema::json::Json>(
    mut options: jsonschema::ValidationOptions<'_, std::sync::Arc<dyn jsonschema::Retrieve>, F>,
    schema: &Value,
) -> Result<jsonschema::Validator<F>, String> {
    if schema.get("$schema").is_none() {
        options = options.with_draft(Draft::Draft4);
    }
    options.build(schema).map_err(|e| e.to_string())
}

/// A built-in schema for the full check only (`base_event`, `tagged_event`).
fn built_in_full(name: &str) -> Validator {
    let text = built_in(name).expect("built-in schema");
    let schema: Value = serde_json::from_str(text).expect("the built-in schemas are JSON");
    build(jsonschema::options(), &schema).expect("the built-in schemas compile")
}

fn built_in(name: &str) -> Option<&'static str> {
    BUILT_IN
        .iter()
        .find(|(built_in, _)| *built_in == name)
        .map(|(_, text)| *text)
}

impl SchemaRegistry {
    /// A registry over the built-in schemas and then `roots`, in order.
    pub fn new(roots: Vec<PathBuf>) -> Self {
        SchemaRegistry {
            roots,
            base: built_in_full("base_event"),
            tagged: built_in_full("tagged_event"),
            compiled: RwLock::new(HashMap::new()),
        }
    }

    /// The folders searched after the built-in schemas.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn candidates(&self, event_type: &str) -> Vec<PathBuf> {
        let file = format!("{event_type}.json");
        self.roots.iter().map(|root| root.join(&file)).collect()
    }

    fn load(&self, event_type: &str) -> Result<Arc<Compiled>, JournalError> {
        let cached = self
            .compiled
            .read()
            .expect("poisoned")
            .get(event_type)
            .cloned();
        let cached = match cached {
            Some(cached) => cached,
            None => {
                let loaded = self.find_and_compile(event_type);
                self.compiled
                    .write()
                    .expect("poisoned")
                    .entry(event_type.to_owned())
                    .or_insert(loaded)
                    .clone()
            }
        };
        match cached {
            Cached::Ready(validator) => Ok(validator),
            Cached::Missing(searched) => Err(JournalError::SchemaNotFound {
                event_type: event_type.to_owned(),
                searched: searched.to_vec(),
            }),
            Cached::Invalid { path, message } => Err(JournalError::InvalidSchema {
                event_type: event_type.to_owned(),
                path: path.to_string(),
                message: message.to_string(),
            }),
        }
    }

    /// Reads and compiles a schema once; a missing or broken one is remembered too, so a hot
    /// path that journals it does not touch the file system again (restart to pick up a fix).
    fn find_and_compile(&self, event_type: &str) -> Cached {
        let compiled = |path: &str, text: &str| match compile(event_type, path, text) {
            Ok(compiled) => Cached::Ready(Arc::new(compiled)),
            Err(JournalError::InvalidSchema { path, message, .. }) => Cached::Invalid {
                path: path.into(),
                message: message.into(),
            },
            Err(other) => Cached::Invalid {
                path: path.into(),
                message: other.to_string().into(),
            },
        };
        if let Some(text) = built_in(event_type) {
            return compiled("<built-in>", text);
        }
        // An event type is a file stem, never a path.
        let safe = !event_type.is_empty()
            && !event_type.contains(['/', '\\'])
            && event_type != ".."
            && event_type != ".";
        if !safe {
            return Cached::Missing(Arc::from(Vec::new()));
        }
        let searched = self.candidates(event_type);
        match searched
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok().map(|t| (path, t)))
        {
            Some((path, text)) => compiled(&path.display().to_string(), &text),
            None => Cached::Missing(Arc::from(searched)),
        }
    }

    /// Compiles, now, every schema a lookup can find — the built-in ones and each `*.json`
    /// directly in a root, the first root holding a name winning — so that no `journal!` pays
    /// for compiling one (a large schema can take seconds) inside the application's
    /// transaction. Returns how many are ready; a broken file is an error naming it (it stays
    /// remembered as broken, as a lookup would remember it). CPU-bound: call it at start-up,
    /// or through [`Journaled::preload_schemas`](crate::Journaled::preload_schemas).
    pub fn preload(&self) -> Result<usize, JournalError> {
        let mut names: Vec<String> = BUILT_IN
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect();
        for root in &self.roots {
            let mut files = Vec::new();
            collect_json(root, &mut files);
            files.sort();
            names.extend(
                files
                    .iter()
                    .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned())),
            );
        }
        let mut seen = std::collections::HashSet::new();
        let mut ready = 0;
        let mut first_error = None;
        for name in names {
            if !seen.insert(name.clone()) {
                continue;
            }
            match self.load(&name) {
                Ok(_) => ready += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(ready),
        }
    }

    /// Validates a whole event against `base_event`, `tagged_event` (when tagged) and its own
    /// schema, collecting every violation.
    pub fn validate(
        &self,
        event_type: &str,
        tagged: bool,
        event: &Value,
    ) -> Result<(), JournalError> {
        let own = self.load(event_type)?;
        let schemas: [(&str, Option<&Validator>); 3] = [
            ("base_event", Some(&self.base)),
            ("tagged_event", tagged.then_some(&self.tagged)),
            (event_type, Some(&own.full)),
        ];
        if schemas
            .iter()
            .all(|(_, v)| v.is_none_or(|v| v.is_valid(event)))
        {
            return Ok(());
        }
        let violations = schemas
            .iter()
            .filter_map(|(name, v)| v.map(|v| (name, v)))
            .flat_map(|(name, validator)| {
                validator.iter_errors(event).map(move |error| Violation {
                    schema: (*name).to_owned(),
                    pointer: error.instance_path().to_string(),
                    message: error.masked().to_string(),
                })
            })
            .collect();
        Err(JournalError::SchemaViolation {
            event_type: event_type.to_owned(),
            violations,
        })
    }

    /// [`validate`](Self::validate) for an envelope journaled wrote itself: `base_event` and
    /// `tagged_event` hold by construction (a UUID id, the type's name, a formatted time, a tags
    /// object; `event::prepare` checks the one input, a non-empty event type), so the fast path
    /// runs the event's own schema alone, on the event's text read in place (`document`). A
    /// failure, or text the fast path does not read (`None`), is checked again on the value
    /// `value` builds, which reports every schema's violations.
    pub(crate) fn validate_generated(
        &self,
        event_type: &str,
        tagged: bool,
        document: Option<&Document<'_>>,
        value: impl FnOnce() -> Result<Value, JournalError>,
    ) -> Result<(), JournalError> {
        let own = self.load(event_type)?;
        if document.is_some_and(|document| own.fast.is_valid(document.root())) {
            return Ok(());
        }
        let value = value()?;
        if document.is_none() && own.full.is_valid(&value) {
            return Ok(());
        }
        self.validate(event_type, tagged, &value)
    }

    /// Compiles the built-in schemas and every `*.json` file directly in each root (where
    /// lookups find them), reporting each one. Files shadowed by an earlier root are checked too.
    pub fn check(&self) -> Vec<CheckedSchema> {
        let mut out: Vec<CheckedSchema> = BUILT_IN
            .iter()
            .map(|(name, text)| CheckedSchema {
                path: Path::new("<built-in>").join(format!("{name}.json")),
                error: compile(name, "<built-in>", text).err(),
            })
            .collect();
        for root in &self.roots {
            let mut files = Vec::new();
            collect_json(root, &mut files);
            files.sort();
            for path in files {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let error = match std::fs::read_to_string(&path) {
                    Ok(text) => compile(&stem, &path.display().to_string(), &text).err(),
                    Err(e) => Some(JournalError::InvalidSchema {
                        event_type: stem,
                        path: path.display().to_string(),
                        message: format!("cannot be read: {e}"),
                    }),
                };
                out.push(CheckedSchema { path, error });
            }
        }
        out
    }
}

fn collect_json(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_are_remembered_even_when_they_fail() {
        let dir = std::env::temp_dir().join(format!("journaled-schema-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("nested")).unwrap();
        let registry = SchemaRegistry::new(vec![dir.clone()]);
        let event = serde_json::json!({"id": "x", "event_type": "late", "created_at": "2026-01-01T00:00:00Z"});
        assert!(matches!(
            registry.validate("late", false, &event),
            Err(JournalError::SchemaNotFound { .. })
        ));
        std::fs::write(dir.join("late.json"), "{}").unwrap();
        assert!(
            matches!(
                registry.validate("late", false, &event),
                Err(JournalError::SchemaNotFound { .. })
            ),
            "a miss is remembered: no file-system probe per event"
        );
        assert!(
            SchemaRegistry::new(vec![dir.clone()])
                .validate("late", false, &event)
                .is_ok()
        );
        assert!(matches!(
            registry.validate("../late", false, &event),
            Err(JournalError::SchemaNotFound { ref searched, .. }) if searched.is_empty()
        ));
        std::fs::write(dir.join("nested/unreachable.json"), "{").unwrap();
        let checked = registry.check();
        assert!(
            checked
                .iter()
                .all(|c| !c.path.ends_with("unreachable.json")),
            "only files lookups can find"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
