//! The fake's people: who can log in on the login page, and `GET /api/v2/users/me`.

use http::{Response, StatusCode};

use crate::body::FakeBody;
use crate::state::Inner;

/// A person who can log in to the fake (see [`FakeGenesys::set_users`](crate::FakeGenesys::set_users)).
///
/// ```
/// use genesys_fake::FakeUser;
///
/// let user = FakeUser::new("u-1", "Ada Lovelace");
/// assert_eq!(user.name, "Ada Lovelace");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeUser {
    /// The user's id, as `GET /api/v2/users/me` answers it.
    pub id: String,
    /// The user's name, shown on the login page and answered by `GET /api/v2/users/me`.
    pub name: String,
}

impl FakeUser {
    /// A user with this id and name.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
        }
    }
}

/// The users a new fake has: three, with ids in Genesys' UUID form.
pub(crate) fn default_users() -> Vec<FakeUser> {
    vec![
        FakeUser::new("00000000-0000-4000-8000-000000000001", "Ada Lovelace"),
        FakeUser::new("00000000-0000-4000-8000-000000000002", "Grace Hopper"),
        FakeUser::new("00000000-0000-4000-8000-000000000003", "Alan Turing"),
    ]
}

/// `GET /api/v2/users/me` for a valid `token`: the user it was issued for.
///
/// A client-credentials token has no user. What Genesys answers then is not in GENESYS.md;
/// the fake answers `400` with its usual error body and the code `bad.request`, so a client
/// sees a refusal that is not a 401 (a refresh would not help).
pub(crate) fn me(inner: &Inner, token: &str) -> Response<FakeBody> {
    match inner.login.user_of(token) {
        Some(user) => crate::handler::json(
            StatusCode::OK,
            serde_json::json!({ "id": user.id, "name": user.name }).to_string(),
        ),
        None => crate::handler::genesys_error(
            StatusCode::BAD_REQUEST,
            "bad.request",
            "This request requires a user context; a client-credentials token has none.",
        ),
    }
}
