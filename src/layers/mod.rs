//! One file per layer of the onion; the order lives in `crate::stack`.

pub mod account_limit;
pub mod authenticate;
pub mod classify;
pub mod client_limit;
pub mod coalesce;
pub mod credits;
pub mod guard;
pub mod idempotency;
pub mod inject_key;
pub mod observe;
pub mod read_body;
pub mod respond;
pub mod scope;
pub mod status_cache;

pub use crate::util::BoxFuture;

/// Take the service that `poll_ready` readied and leave a clone in its place: a layer that
/// awaits before calling `inner` must not call an unready clone.
pub(crate) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
