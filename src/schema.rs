//! The schema registry: finds `<event_type>.json`, compiles it once, and validates events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use jsonschema::{Draft, Validator};
use serde_json::Value;

use crate::error::{Error, Violation};

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

/// What [`SchemaRegistry::check`] found for one schema file.
#[derive(Debug)]
pub struct CheckedSchema {
    /// The file, or `<built-in>/name.json`.
    pub path: PathBuf,
    /// `None` when it compiled; the problem otherwise.
    pub error: Option<Error>,
}

/// Loads and compiles schemas once, then validates events against them.
///
/// Search order: the crate's built-in schemas, then each configured root in order; the first
/// file found wins. A schema without `$schema` is read as Draft 4, as the reference gem does.
pub struct SchemaRegistry {
    roots: Vec<PathBuf>,
    base: Validator,
    tagged: Validator,
    compiled: RwLock<HashMap<String, Arc<Validator>>>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

fn compile(event_type: &str, path: &str, text: &str) -> Result<Validator, Error> {
    let invalid = |message: String| Error::InvalidSchema {
        event_type: event_type.to_owned(),
        path: path.to_owned(),
        message,
    };
    let schema: Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let mut options = jsonschema::options();
    if schema.get("$schema").is_none() {
        options = options.with_draft(Draft::Draft4);
    }
    options.build(&schema).map_err(|e| invalid(e.to_string()))
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
        let load = |name: &str| {
            compile(name, "<built-in>", built_in(name).expect("built-in schema"))
                .expect("the built-in schemas compile")
        };
        SchemaRegistry {
            roots,
            base: load("base_event"),
            tagged: load("tagged_event"),
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

    fn load(&self, event_type: &str) -> Result<Arc<Validator>, Error> {
        if let Some(validator) = self.compiled.read().expect("poisoned").get(event_type) {
            return Ok(validator.clone());
        }
        let validator = if let Some(text) = built_in(event_type) {
            compile(event_type, "<built-in>", text)?
        } else {
            let searched = self.candidates(event_type);
            // An event type is a file stem, never a path.
            let safe = !event_type.is_empty()
                && !event_type.contains(['/', '\\'])
                && event_type != ".."
                && event_type != ".";
            let found = searched
                .iter()
                .filter(|_| safe)
                .find_map(|path| std::fs::read_to_string(path).ok().map(|t| (path, t)));
            let Some((path, text)) = found else {
                return Err(Error::SchemaNotFound {
                    event_type: event_type.to_owned(),
                    searched: if safe { searched } else { Vec::new() },
                });
            };
            compile(event_type, &path.display().to_string(), &text)?
        };
        let validator = Arc::new(validator);
        self.compiled
            .write()
            .expect("poisoned")
            .entry(event_type.to_owned())
            .or_insert_with(|| validator.clone());
        Ok(validator)
    }

    /// Validates a whole event against `base_event`, `tagged_event` (when tagged) and its own
    /// schema, collecting every violation.
    pub fn validate(&self, event_type: &str, tagged: bool, event: &Value) -> Result<(), Error> {
        let own = self.load(event_type)?;
        let schemas: [(&str, Option<&Validator>); 3] = [
            ("base_event", Some(&self.base)),
            ("tagged_event", tagged.then_some(&self.tagged)),
            (event_type, Some(&own)),
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
        Err(Error::SchemaViolation {
            event_type: event_type.to_owned(),
            violations,
        })
    }

    /// Compiles the built-in schemas and every `*.json` file under each root (recursively),
    /// reporting each one. Files shadowed by an earlier root are checked too.
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
                    Err(e) => Some(Error::InvalidSchema {
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
        if path.is_dir() {
            collect_json(&path, out);
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}
