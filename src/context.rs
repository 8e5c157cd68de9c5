//! Task-local context captured when an event is journaled: tags, actor, app name, commit hash.
//!
//! Scopes are task-local (`tokio::task_local!`): they follow a future across `.await` points and
//! threads, and concurrent tasks never see each other's tags. A task started with
//! `tokio::spawn` starts with no scope; carry one over with [`Context::current`] and
//! [`Context::scope`].

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

use serde_json::{Map, Value};

/// Tags: a JSON object of request id, job id, and whatever else traces an event back.
pub type Tags = Map<String, Value>;

pub use crate::error::ContextError;

#[derive(Debug, Default)]
struct Scope {
    tags: RefCell<Tags>,
    actor: Option<Arc<str>>,
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// A snapshot of the current tags and actor, to carry into a spawned task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    /// The tags in force.
    pub tags: Tags,
    /// The actor in force.
    pub actor: Option<String>,
}

impl Context {
    /// The tags and actor of the current scope (empty outside any scope).
    pub fn current() -> Context {
        SCOPE
            .try_with(|scope| Context {
                tags: scope.tags.borrow().clone(),
                actor: scope.actor.as_deref().map(str::to_owned),
            })
            .unwrap_or_default()
    }

    /// Runs `fut` in a new scope holding this context.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        let scope = Scope {
            tags: RefCell::new(self.tags),
            actor: self.actor.map(Arc::from),
        };
        SCOPE.scope(scope, fut).await
    }
}

fn child(extra_tags: Tags, actor: Option<Arc<str>>) -> Scope {
    SCOPE
        .try_with(|parent| {
            let mut tags = parent.tags.borrow().clone();
            tags.extend(extra_tags.clone());
            Scope {
                tags: RefCell::new(tags),
                actor: actor.clone().or_else(|| parent.actor.clone()),
            }
        })
        .unwrap_or_else(|_| Scope {
            tags: RefCell::new(extra_tags),
            actor,
        })
}

/// Runs `fut` in a scope that inherits the current tags and actor; `tag!` inside it changes
/// only this scope.
pub async fn scope<F: Future>(fut: F) -> F::Output {
    SCOPE.scope(child(Tags::new(), None), fut).await
}

/// Runs `fut` with `tags` added to the current ones; they are gone when it ends.
pub async fn tagged<F: Future>(tags: Tags, fut: F) -> F::Output {
    SCOPE.scope(child(tags, None), fut).await
}

/// Runs `fut` with `actor` (for example `gid://my_app/User/42`) as the actor of what it journals.
pub async fn with_actor<F: Future>(actor: impl Into<String>, fut: F) -> F::Output {
    let actor: Arc<str> = Arc::from(actor.into());
    SCOPE.scope(child(Tags::new(), Some(actor)), fut).await
}

/// Adds tags to the innermost scope. Use the [`tag!`](crate::tag) macro.
pub fn add_tags(tags: Tags) -> Result<(), ContextError> {
    SCOPE
        .try_with(|scope| scope.tags.borrow_mut().extend(tags))
        .map_err(|_| ContextError::NoScope)
}

/// The tags in force (empty outside any scope).
pub fn current_tags() -> Tags {
    SCOPE
        .try_with(|scope| scope.tags.borrow().clone())
        .unwrap_or_default()
}

/// The actor set by [`with_actor`], if any.
pub fn current_actor() -> Option<String> {
    SCOPE
        .try_with(|scope| scope.actor.as_deref().map(str::to_owned))
        .ok()
        .flatten()
}

static CONFIGURED_APP_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records the app name of the first `Journaled` built with `Config::with_app_name`.
pub(crate) fn configure_app_name(name: &str) {
    let _ = CONFIGURED_APP_NAME.set(name.to_owned());
}

/// The application's name: the first one configured with `Config::with_app_name`, else
/// `JOURNALED_APP_NAME`, else the executable's file name.
pub fn app_name() -> String {
    CONFIGURED_APP_NAME
        .get()
        .cloned()
        .or_else(|| std::env::var("JOURNALED_APP_NAME").ok())
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "app".to_owned())
}

/// The actor of what is journaled now: the scope's actor; else `gid://<app>/<os user>` for a
/// command-line run (stdin is a terminal); else `gid://<app>`.
pub fn actor_uri() -> String {
    current_actor().unwrap_or_else(|| {
        use std::io::IsTerminal;
        let user = std::env::var("USER")
            .ok()
            .or_else(|| std::env::var("LOGNAME").ok());
        fallback_actor(&app_name(), std::io::stdin().is_terminal(), user)
    })
}

/// The actor when none is set: `gid://<app>/<os user>` for command-line runs (stdin is a
/// terminal), `gid://<app>` otherwise, as the reference does.
pub(crate) fn fallback_actor(app: &str, command_line: bool, user: Option<String>) -> String {
    match (command_line, user) {
        (true, Some(user)) if !user.is_empty() => format!("gid://{app}/{user}"),
        _ => format!("gid://{app}"),
    }
}

/// The deployed commit, from `GIT_COMMIT`; an error when it is unset, as in the reference.
pub fn commit_hash() -> Result<String, ContextError> {
    commit_hash_from(std::env::var("GIT_COMMIT").ok())
}

fn commit_hash_from(value: Option<String>) -> Result<String, ContextError> {
    value
        .map(|hash| hash.trim().to_owned())
        .filter(|hash| !hash.is_empty())
        .ok_or(ContextError::GitCommitUnset)
}

/// Builds [`Tags`] from `key = value` pairs; values are anything `serde_json::json!` takes.
///
/// ```
/// let tags = journaled::tags! { request_id = "abc", attempt = 2 };
/// assert_eq!(tags["attempt"], 2);
/// ```
#[macro_export]
macro_rules! tags {
    ($($key:ident = $value:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut tags = $crate::Tags::new();
        $( tags.insert(::std::string::String::from(stringify!($key)), $crate::__private::json!($value)); )*
        tags
    }};
}

/// Adds `key = value` tags to the innermost scope; returns `Err(ContextError::NoScope)` outside one.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// journaled::scope(async {
///     journaled::tag!(request_id = "abc").unwrap();
///     assert_eq!(journaled::current_tags()["request_id"], "abc");
/// }).await;
/// # }
/// ```
#[macro_export]
macro_rules! tag {
    ($($key:ident = $value:expr),* $(,)?) => {
        $crate::context::add_tags($crate::tags! { $($key = $value),* })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_actors() {
        assert_eq!(
            fallback_actor("app", true, Some("ada".into())),
            "gid://app/ada"
        );
        assert_eq!(fallback_actor("app", true, None), "gid://app");
        assert_eq!(
            fallback_actor("app", false, Some("ada".into())),
            "gid://app"
        );
    }

    #[test]
    fn commit_hash_needs_git_commit() {
        assert_eq!(commit_hash_from(None), Err(ContextError::GitCommitUnset));
        assert_eq!(
            commit_hash_from(Some(" ".into())),
            Err(ContextError::GitCommitUnset)
        );
        assert_eq!(commit_hash_from(Some("abc123\n".into())).unwrap(), "abc123");
        assert!(
            ContextError::GitCommitUnset
                .to_string()
                .contains("GIT_COMMIT")
        );
    }
}
