//! Request attribution for web services (feature `tower`): a [tower] layer that runs every
//! request in a journaled scope holding the request's actor and tags — the reference's
//! controller attribution (`self.journaled_actor = :current_user`).
//!
//! ```
//! use journaled::tower::{Impersonation, JournaledLayer};
//!
//! /// Put in the request's extensions by the application's authentication layer.
//! #[derive(Clone)]
//! struct CurrentUser {
//!     id: i64,
//!     acting_as: Option<i64>,
//! }
//!
//! let layer = JournaledLayer::new() // x-request-id → tag `request_id`, on by default
//!     .actor(|req| req.extensions.get::<CurrentUser>().map(|u| format!("gid://app/User/{}", u.id)))
//!     .impersonation(|req| {
//!         let user = req.extensions.get::<CurrentUser>()?;
//!         Some(Impersonation::new(
//!             format!("gid://app/User/{}", user.id),
//!             format!("gid://app/User/{}", user.acting_as?),
//!         ))
//!     })
//!     .tag_header("x-tenant", "tenant");
//! // axum:  Router::new().route(…).layer(layer).layer(auth)   (auth runs first: outermost)
//! // tonic: Server::builder().layer(auth).layer(layer).add_service(…)
//! # let _ = layer;
//! ```
//!
//! Everything `journal!` or `Transaction::audit` does while the inner service's future runs
//! sees that scope: audit events carry the actor and the tags, tagged events carry the tags,
//! and [`actor_uri`](crate::actor_uri) returns the actor.
//!
//! # What the closures see
//!
//! The actor, impersonation and tag closures take the request's [`http::request::Parts`]
//! (method, URI, version, headers, extensions) rather than the request, so one layer works for
//! every body type: axum's, tonic's (gRPC metadata are HTTP headers), hyper's, or your own. The
//! request is split and put back together around them, which moves nothing but the parts.
//!
//! Whatever the closures read must be there when the request reaches this layer: add the
//! authentication layer that puts the user in the extensions, and tower-http's
//! `SetRequestIdLayer` that makes up missing request ids, *outside* this one.
//!
//! # Actor and impersonation
//!
//! - [`JournaledLayer::impersonation`], when it returns `Some`, wins: the event's actor is the
//!   identity being acted as, and the real actor is the tag [`IMPERSONATOR_TAG`]
//!   (`"impersonator"`). As in the reference's audit-logging notes: a write made while
//!   impersonating is logged against the impersonated user and tagged as an impersonation.
//!   Tagged events and audit events carry the tag; an event that records only an actor records
//!   the impersonated one.
//! - Else [`JournaledLayer::actor`], when it returns `Some`.
//! - Else the layer sets no actor: an enclosing scope's actor stays in force, and without one
//!   the fallback rules of [`actor_uri`](crate::actor_uri) apply, as for any code outside a
//!   request (`gid://<app>`; `gid://<app>/<os user>` when the process's stdin is a terminal,
//!   as for a server started by hand).
//!
//! # Tags
//!
//! The request's tags are added to any tags already in scope, in this order, a later one
//! replacing an earlier one of the same name: headers ([`JournaledLayer::tag_header`]; by
//! default `x-request-id` → `request_id`, the header tower-http's request-id layers set and
//! propagate), then extensions and custom tags in the order they were added, then
//! `impersonator`. A header that is absent adds no tag; a repeated header counts by its first
//! value; header values are untrusted input, so a tag taken from one keeps at most
//! [`MAX_HEADER_TAG_CHARS`] characters.
//!
//! # What the scope covers, and what it does not
//!
//! The scope covers the future the inner service returns: for axum and tonic, the middleware
//! below this layer and the handler, up to the moment the response (its head) is ready. It does
//! not cover:
//!
//! - **Streaming response bodies.** A body is polled after the response future has finished,
//!   outside the scope. Journal in the handler; or take [`Context::current`] in the handler and
//!   run the body's work inside `context.scope(…)`.
//! - **Spawned tasks.** `tokio::spawn` starts a task with no scope. Carry it over:
//!   `tokio::spawn(Context::current().scope(work))`.
//! - **Work the inner service does synchronously in `call`**, before its future is polled
//!   (axum and tonic do none that journals).
//!
//! The future is boxed, so the inner service's future must be `Send + 'static`, as axum, tonic
//! and hyper require anyway. Concurrent requests never see each other's actor or tags: the
//! scope is task-local and belongs to the request's future.
//!
//! [tower]: https://docs.rs/tower
//! [`Context::current`]: crate::Context::current

use std::fmt;
use std::sync::Arc;
use std::task::Poll;

use crate::store::BoxFuture;
use http::request::Parts;
use http::{HeaderName, Request};
use serde_json::Value;

use crate::context::{Tags, tagged, with_actor};

/// The header read for the request id by default: tower-http's `x-request-id`.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The tag the request id goes in by default.
pub const REQUEST_ID_TAG: &str = "request_id";

/// The tag holding the real actor of an impersonated request.
pub const IMPERSONATOR_TAG: &str = "impersonator";

/// The longest tag value taken from a header, in characters; longer values are cut.
pub const MAX_HEADER_TAG_CHARS: usize = 512;

/// Someone acting as someone else: staff impersonating a user, say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    /// Who is really acting (`gid://app/Staff/7`): goes in the `impersonator` tag.
    pub real_actor: String,
    /// Whom they act as (`gid://app/User/42`): the actor of what is journaled.
    pub acting_as: String,
}

impl Impersonation {
    /// `real_actor` acting as `acting_as`.
    pub fn new(real_actor: impl Into<String>, acting_as: impl Into<String>) -> Self {
        Impersonation {
            real_actor: real_actor.into(),
            acting_as: acting_as.into(),
        }
    }
}

type ActorFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type ImpersonationFn = dyn Fn(&Parts) -> Option<Impersonation> + Send + Sync;
type TagsFn = dyn Fn(&Parts, &mut Tags) + Send + Sync;

#[derive(Clone)]
struct Rules {
    actor: Option<Arc<ActorFn>>,
    impersonation: Option<Arc<ImpersonationFn>>,
    headers: Vec<(HeaderName, String)>,
    tags: Vec<Arc<TagsFn>>,
}

impl Rules {
    /// The actor and tags of one request.
    fn attribute(&self, parts: &Parts) -> (Option<String>, Tags) {
        let mut tags = Tags::new();
        for (header, tag) in &self.headers {
            if let Some(value) = parts.headers.get(header) {
                let value = String::from_utf8_lossy(value.as_bytes());
                let value: String = value.chars().take(MAX_HEADER_TAG_CHARS).collect();
                tags.insert(tag.clone(), Value::String(value));
            }
        }
        for add in &self.tags {
            add(parts, &mut tags);
        }
        let impersonation = self.impersonation.as_ref().and_then(|f| f(parts));
        let actor = match impersonation {
            Some(Impersonation {
                real_actor,
                acting_as,
            }) => {
                tags.insert(IMPERSONATOR_TAG.to_owned(), Value::String(real_actor));
                Some(acting_as)
            }
            None => self.actor.as_ref().and_then(|f| f(parts)),
        };
        (actor, tags)
    }
}

/// A tower [`Layer`](tower_layer::Layer) that runs each `http::Request` in a journaled scope
/// holding its actor and tags. See the [module docs](self) for the rules.
///
/// Cheap to clone: the configuration is shared.
#[derive(Clone)]
pub struct JournaledLayer {
    rules: Arc<Rules>,
}

impl Default for JournaledLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for JournaledLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournaledLayer")
            .field("actor", &self.rules.actor.is_some())
            .field("impersonation", &self.rules.impersonation.is_some())
            .field("headers", &self.rules.headers)
            .field("tags", &self.rules.tags.len())
            .finish()
    }
}

impl JournaledLayer {
    /// A layer that tags `request_id` from the `x-request-id` header and sets no actor.
    pub fn new() -> Self {
        JournaledLayer {
            rules: Arc::new(Rules {
                actor: None,
                impersonation: None,
                headers: vec![(
                    HeaderName::from_static(REQUEST_ID_HEADER),
                    REQUEST_ID_TAG.to_owned(),
                )],
                tags: Vec::new(),
            }),
        }
    }

    fn rules(&mut self) -> &mut Rules {
        Arc::make_mut(&mut self.rules)
    }

    /// The actor of a request (`gid://app/User/42`), or `None` for no actor, typically read
    /// from what the authentication layer put in `req.extensions`.
    pub fn actor<F, A>(mut self, actor: F) -> Self
    where
        F: Fn(&Parts) -> Option<A> + Send + Sync + 'static,
        A: Into<String>,
    {
        self.rules().actor = Some(Arc::new(move |parts| actor(parts).map(Into::into)));
        self
    }

    /// Who acts as whom, when a request is impersonated; `None` when it is not. When it is,
    /// the acting-as identity is the actor and the real actor goes in the `impersonator` tag.
    pub fn impersonation<F>(mut self, impersonation: F) -> Self
    where
        F: Fn(&Parts) -> Option<Impersonation> + Send + Sync + 'static,
    {
        self.rules().impersonation = Some(Arc::new(impersonation));
        self
    }

    /// Tags `tag` with the value of `header` when the request has it. A header already mapped
    /// is mapped again: `.tag_header("x-request-id", "req")` renames the request id tag.
    ///
    /// # Panics
    ///
    /// When `header` is not a valid header name.
    pub fn tag_header<H>(mut self, header: H, tag: impl Into<String>) -> Self
    where
        H: TryInto<HeaderName>,
        H::Error: fmt::Debug,
    {
        let header = header
            .try_into()
            .expect("tag_header: an invalid header name");
        let tag = tag.into();
        let headers = &mut self.rules().headers;
        match headers.iter_mut().find(|(name, _)| *name == header) {
            Some((_, existing)) => *existing = tag,
            None => headers.push((header, tag)),
        }
        self
    }

    /// Stops tagging from `header`: `.without_tag_header("x-request-id")` drops the default.
    ///
    /// # Panics
    ///
    /// When `header` is not a valid header name.
    pub fn without_tag_header<H>(mut self, header: H) -> Self
    where
        H: TryInto<HeaderName>,
        H::Error: fmt::Debug,
    {
        let header = header
            .try_into()
            .expect("without_tag_header: an invalid header name");
        self.rules().headers.retain(|(name, _)| *name != header);
        self
    }

    /// Tags `tag` with `value(&t)` when the request's extensions hold a `T` (put there by an
    /// earlier layer: a session, a tenant, tower-http's `RequestId`…).
    pub fn tag_extension<T, V>(
        mut self,
        tag: impl Into<String>,
        value: impl Fn(&T) -> V + Send + Sync + 'static,
    ) -> Self
    where
        T: Send + Sync + 'static,
        V: Into<Value>,
    {
        let tag = tag.into();
        self.rules().tags.push(Arc::new(move |parts, tags| {
            if let Some(extension) = parts.extensions.get::<T>() {
                tags.insert(tag.clone(), value(extension).into());
            }
        }));
        self
    }

    /// Adds whatever tags `tags` makes of a request: the method, the matched route, a header
    /// parsed…
    pub fn tags_with<F>(mut self, tags: F) -> Self
    where
        F: Fn(&Parts) -> Tags + Send + Sync + 'static,
    {
        self.rules()
            .tags
            .push(Arc::new(move |parts, into| into.extend(tags(parts))));
        self
    }
}

impl<S> tower_layer::Layer<S> for JournaledLayer {
    type Service = JournaledService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JournaledService {
            inner,
            rules: self.rules.clone(),
        }
    }
}

/// The service [`JournaledLayer`] wraps around another: runs each request's future in a
/// journaled scope holding its actor and tags.
#[derive(Clone)]
pub struct JournaledService<S> {
    inner: S,
    rules: Arc<Rules>,
}

impl<S: fmt::Debug> fmt::Debug for JournaledService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournaledService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> JournaledService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> tower_service::Service<Request<B>> for JournaledService<S>
where
    S: tower_service::Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let (actor, tags) = self.rules.attribute(&parts);
        let response = self.inner.call(Request::from_parts(parts, body));
        match actor {
            Some(actor) => Box::pin(tagged(tags, with_actor(actor, response))),
            None => Box::pin(tagged(tags, response)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;

    use tower_layer::Layer;
    use tower_service::Service;

    use super::*;
    use crate::{Context, tags};

    /// Answers with the context it sees after yielding a few times, so concurrent requests
    /// interleave on the runtime's threads.
    #[derive(Clone)]
    struct Echo;

    impl<B> Service<Request<B>> for Echo {
        type Response = Context;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Context, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<B>) -> Self::Future {
            Box::pin(async {
                let before = Context::current();
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
                assert_eq!(Context::current(), before, "the scope changed mid-request");
                Ok(before)
            })
        }
    }

    #[derive(Clone)]
    struct User(i64);

    #[derive(Clone)]
    struct ActingAs(i64);

    fn gid(id: i64) -> String {
        format!("gid://app/User/{id}")
    }

    fn layer() -> JournaledLayer {
        JournaledLayer::new()
            .actor(|req| req.extensions.get::<User>().map(|u| gid(u.0)))
            .impersonation(|req| {
                let real = req.extensions.get::<User>()?;
                let acting_as = req.extensions.get::<ActingAs>()?;
                Some(Impersonation::new(gid(real.0), gid(acting_as.0)))
            })
            .tag_header("X-Tenant", "tenant")
            .tag_extension("user_id", |u: &User| u.0)
    }

    async fn context_of<B>(layer: &JournaledLayer, request: Request<B>) -> Context {
        layer.layer(Echo).call(request).await.unwrap()
    }

    fn request(user: Option<i64>, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/orders");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(id) = user {
            builder = builder.extension(User(id));
        }
        builder.body(()).unwrap()
    }

    #[tokio::test]
    async fn the_actor_and_tags_come_from_the_request() {
        let request = request(Some(42), &[("x-request-id", "req-1"), ("x-tenant", "acme")]);
        assert_eq!(
            context_of(&layer(), request).await,
            Context {
                actor: Some(gid(42)),
                tags: tags! { request_id = "req-1", tenant = "acme", user_id = 42 },
            }
        );
    }

    #[tokio::test]
    async fn without_an_actor_or_headers_the_scope_is_empty() {
        let context = context_of(&layer(), request(None, &[])).await;
        assert_eq!(context, Context::default());
        // And the default layer, on a body of another type.
        let request = Request::new(String::from("body"));
        assert_eq!(
            context_of(&JournaledLayer::new(), request).await,
            Context::default()
        );
    }

    #[tokio::test]
    async fn no_actor_keeps_the_enclosing_scope() {
        let outer = Context {
            actor: Some("gid://app/Job/1".into()),
            tags: tags! { job_id = 1 },
        };
        let request = request(None, &[("x-request-id", "req-2")]);
        let context = outer.scope(context_of(&layer(), request)).await;
        assert_eq!(context.actor.as_deref(), Some("gid://app/Job/1"));
        assert_eq!(context.tags, tags! { job_id = 1, request_id = "req-2" });
    }

    #[tokio::test]
    async fn an_impersonated_request_acts_as_the_user_and_names_the_impersonator() {
        let mut request = request(Some(7), &[("x-request-id", "req-3")]);
        request.extensions_mut().insert(ActingAs(42));
        let context = context_of(&layer(), request).await;
        assert_eq!(context.actor, Some(gid(42)));
        assert_eq!(context.tags[IMPERSONATOR_TAG], gid(7));
        assert_eq!(context.tags[REQUEST_ID_TAG], "req-3");
    }

    #[tokio::test]
    async fn header_mappings_can_be_renamed_removed_and_extended() {
        let headers = [("x-request-id", "req-4"), ("x-tenant", "acme")];
        let renamed = JournaledLayer::new().tag_header(REQUEST_ID_HEADER, "req");
        assert_eq!(
            context_of(&renamed, request(None, &headers)).await.tags,
            tags! { req = "req-4" }
        );
        let removed = layer().without_tag_header("x-request-id");
        assert_eq!(
            context_of(&removed, request(None, &headers)).await.tags,
            tags! { tenant = "acme" }
        );
        let custom = JournaledLayer::new().tags_with(|req| tags! { method = req.method.as_str() });
        assert_eq!(
            context_of(&custom, request(None, &headers)).await.tags,
            tags! { request_id = "req-4", method = "GET" }
        );
    }

    #[tokio::test]
    async fn a_header_tag_is_bounded_and_survives_bad_bytes() {
        let long = "x".repeat(MAX_HEADER_TAG_CHARS * 4);
        let context = context_of(&layer(), request(None, &[("x-request-id", &long)])).await;
        assert_eq!(
            context.tags[REQUEST_ID_TAG].as_str().unwrap().len(),
            MAX_HEADER_TAG_CHARS
        );

        let mut request = request(None, &[]);
        request.headers_mut().insert(
            REQUEST_ID_HEADER,
            http::HeaderValue::from_bytes(b"req-\xff").unwrap(),
        );
        let context = context_of(&layer(), request).await;
        assert_eq!(context.tags[REQUEST_ID_TAG], "req-\u{fffd}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_never_see_each_others_context() {
        let service = layer().layer(Echo);
        let requests: Vec<_> = (0..64)
            .map(|i| {
                let mut service = service.clone();
                let request = request(Some(i), &[("x-request-id", &format!("req-{i}"))]);
                tokio::spawn(async move { (i, service.call(request).await.unwrap()) })
            })
            .collect();
        for request in requests {
            let (i, context) = request.await.unwrap();
            assert_eq!(context.actor, Some(gid(i)));
            assert_eq!(
                context.tags,
                tags! { request_id = format!("req-{i}"), user_id = i }
            );
        }
    }
}
