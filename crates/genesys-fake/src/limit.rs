//! API rate limits of the API host: per token, per client and per org, in fixed windows.
//!
//! This module owns the windows and the decision "admit or refuse". It never answers
//! HTTP and never counts: the handler turns a [`Refused`] into Genesys' 429 and bumps
//! the counters.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Genesys' `client.credentials.token.rate.per.minute` (and `token.rate.per.minute`):
/// 300 API requests per token per minute, raisable by a support case.
pub const GENESYS_TOKEN_RATE_PER_MINUTE: u32 = 300;

/// Genesys' `org.app.user.rate.per.minute`: 3,000 API requests per minute per org,
/// OAuth client and user. A client-credentials token has no user, so for it this is a
/// limit per client (within its org).
pub const GENESYS_CLIENT_RATE_PER_MINUTE: u32 = 3_000;

/// Per-token windows kept before the ended ones are dropped (the fake keeps at most
/// about as many issued tokens).
const MAX_TOKEN_WINDOWS: usize = 100_000;

/// The API host's rate limits. Each is `Some((requests, window))`: at most `requests`
/// API requests per `window`, or `None` for no limit in that scope.
///
/// Only API requests that carry a valid token count, and only the ones admitted: a
/// refused request consumes no budget. A request is admitted when every configured
/// scope has room; otherwise it is answered 429 like Genesys does (see
/// [`FakeGenesys::set_api_limits`](crate::FakeGenesys::set_api_limits)).
///
/// Windows are fixed, not sliding: a scope's window starts with the first request that
/// scope sees after the previous window ended (or after the limits were set), and holds
/// `requests` requests until it ends, however they are spread inside it. A window of
/// zero never refuses unless `requests` is 0.
///
/// The default is no limit at all; [`ApiLimits::genesys`] gives Genesys' documented
/// ones. For tests, shorten the window and keep the ratio or not, e.g. 30 per second:
///
/// ```
/// use std::time::Duration;
/// use genesys_fake::{ApiLimits, FakeGenesys};
///
/// let fake = FakeGenesys::builder()
///     .api_limits(ApiLimits {
///         per_token: Some((30, Duration::from_secs(1))),
///         ..ApiLimits::default()
///     })
///     .build_in_process();
/// assert_eq!(fake.api_limits().per_client, None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiLimits {
    /// Requests per window for each token.
    pub per_token: Option<(u32, Duration)>,
    /// Requests per window for all the tokens issued to one OAuth client together.
    pub per_client: Option<(u32, Duration)>,
    /// Requests per window for every request with a valid token, whatever its client.
    pub per_org: Option<(u32, Duration)>,
}

impl ApiLimits {
    /// Genesys' documented defaults: [`GENESYS_TOKEN_RATE_PER_MINUTE`] (300) per token
    /// and [`GENESYS_CLIENT_RATE_PER_MINUTE`] (3,000) per client, each per 60 s window;
    /// no limit per org (none is documented for a whole org).
    pub fn genesys() -> Self {
        const MINUTE: Duration = Duration::from_secs(60);
        ApiLimits {
            per_token: Some((GENESYS_TOKEN_RATE_PER_MINUTE, MINUTE)),
            per_client: Some((GENESYS_CLIENT_RATE_PER_MINUTE, MINUTE)),
            per_org: None,
        }
    }
}

/// The scope of an [`ApiLimits`] limit, for
/// [`FakeGenesys::api_rate_limited_by`](crate::FakeGenesys::api_rate_limited_by).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiLimitScope {
    /// [`ApiLimits::per_token`].
    Token,
    /// [`ApiLimits::per_client`].
    Client,
    /// [`ApiLimits::per_org`].
    Org,
}

impl ApiLimitScope {
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Token => 0,
            Self::Client => 1,
            Self::Org => 2,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Until the last of the full windows ends (freeing only one of them would not help).
    pub(crate) retry_after: Duration,
    /// Every scope whose window was full.
    pub(crate) scopes: Vec<ApiLimitScope>,
}

/// One fixed window: `count` requests admitted in it so far, until `end`.
#[derive(Clone, Copy, Debug)]
struct Window {
    end: Instant,
    count: u32,
}

impl Window {
    /// A window that has already ended: the next request starts a fresh one.
    fn ended(now: Instant) -> Self {
        Window { end: now, count: 0 }
    }

    /// Starts a fresh window at `now` if this one has ended.
    fn roll(&mut self, per: Duration, now: Instant) {
        if now >= self.end {
            self.end = now.checked_add(per).unwrap_or_else(crate::body::far_future);
            self.count = 0;
        }
    }
}

/// The limits in force and every scope's current window.
#[derive(Debug, Default)]
pub(crate) struct ApiLimiter {
    limits: ApiLimits,
    tokens: HashMap<String, Window>,
    clients: HashMap<String, Window>,
    org: Option<Window>,
}

impl ApiLimiter {
    pub(crate) fn new(limits: ApiLimits) -> Self {
        ApiLimiter {
            limits,
            ..ApiLimiter::default()
        }
    }

    pub(crate) fn limits(&self) -> ApiLimits {
        self.limits
    }

    /// Replaces the limits and forgets every window: the next request starts fresh ones.
    pub(crate) fn set_limits(&mut self, limits: ApiLimits) {
        *self = ApiLimiter::new(limits);
    }

    /// Admits a request carrying `token`, issued to `client`, at `now` (and counts it in
    /// every limited scope), or refuses it (and counts it nowhere).
    pub(crate) fn admit(&mut self, token: &str, client: &str, now: Instant) -> Result<(), Refused> {
        let ApiLimits {
            per_token,
            per_client,
            per_org,
        } = self.limits;
        if per_token.is_some() && self.tokens.len() >= MAX_TOKEN_WINDOWS {
            self.tokens.retain(|_, w| w.end > now);
        }
        let mut scoped: Vec<(ApiLimitScope, (u32, Duration), &mut Window)> = Vec::with_capacity(3);
        if let Some(limit) = per_token {
            let w = self
                .tokens
                .entry(token.to_owned())
                .or_insert_with(|| Window::ended(now));
            scoped.push((ApiLimitScope::Token, limit, w));
        }
        if let Some(limit) = per_client {
            let w = self
                .clients
                .entry(client.to_owned())
                .or_insert_with(|| Window::ended(now));
            scoped.push((ApiLimitScope::Client, limit, w));
        }
        if let Some(limit) = per_org {
            let w = self.org.get_or_insert_with(|| Window::ended(now));
            scoped.push((ApiLimitScope::Org, limit, w));
        }

        let mut refused: Option<Refused> = None;
        for (scope, (n, per), w) in &mut scoped {
            w.roll(*per, now);
            if w.count >= *n {
                let r = refused.get_or_insert_with(|| Refused {
                    retry_after: Duration::ZERO,
                    scopes: Vec::new(),
                });
                r.retry_after = r.retry_after.max(w.end - now);
                r.scopes.push(*scope);
            }
        }
        match refused {
            Some(r) => Err(r),
            None => {
                for (_, _, w) in scoped {
                    w.count += 1;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn limiter(token: Option<u32>, client: Option<u32>, org: Option<u32>) -> ApiLimiter {
        ApiLimiter::new(ApiLimits {
            per_token: token.map(|n| (n, SEC)),
            per_client: client.map(|n| (n, SEC)),
            per_org: org.map(|n| (n, SEC)),
        })
    }

    #[test]
    fn no_limits_admit_everything() {
        let mut l = ApiLimiter::default();
        let now = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(l.admit("t", "c", now), Ok(()));
        }
        assert!(l.tokens.is_empty());
    }

    #[test]
    fn fixed_window_refuses_then_frees_at_its_end() {
        let mut l = limiter(Some(2), None, None);
        let t0 = Instant::now();
        assert_eq!(l.admit("t", "c", t0), Ok(()));
        assert_eq!(l.admit("t", "c", t0 + SEC / 4), Ok(()));
        let r = l.admit("t", "c", t0 + SEC / 2).unwrap_err();
        assert_eq!(r.retry_after, SEC / 2);
        assert_eq!(r.scopes, [ApiLimitScope::Token]);
        // A refusal consumes nothing; the window ends one window after its first request.
        assert!(l
            .admit("t", "c", t0 + SEC - Duration::from_nanos(1))
            .is_err());
        assert_eq!(l.admit("t", "c", t0 + SEC), Ok(()));
        assert_eq!(l.admit("other", "c", t0), Ok(()));
    }

    #[test]
    fn every_full_scope_is_reported_and_the_latest_end_wins() {
        let mut l = limiter(Some(1), Some(2), None);
        let t0 = Instant::now();
        l.limits.per_client = Some((2, 3 * SEC));
        assert_eq!(l.admit("a", "c", t0), Ok(()));
        assert_eq!(l.admit("b", "c", t0), Ok(()));
        let r = l.admit("a", "c", t0).unwrap_err();
        assert_eq!(r.scopes, [ApiLimitScope::Token, ApiLimitScope::Client]);
        assert_eq!(r.retry_after, 3 * SEC);
        // A fresh token is refused by the client scope alone, and not counted.
        let r = l.admit("fresh", "c", t0).unwrap_err();
        assert_eq!(r.scopes, [ApiLimitScope::Client]);
        assert_eq!(l.tokens["fresh"].count, 0);
    }

    #[test]
    fn zero_requests_always_refuses_for_a_whole_window() {
        let mut l = limiter(None, None, Some(0));
        let r = l.admit("t", "c", Instant::now()).unwrap_err();
        assert_eq!((r.retry_after, r.scopes), (SEC, vec![ApiLimitScope::Org]));
    }

    #[test]
    fn set_limits_forgets_windows() {
        let mut l = limiter(Some(1), None, None);
        let now = Instant::now();
        assert_eq!(l.admit("t", "c", now), Ok(()));
        assert!(l.admit("t", "c", now).is_err());
        l.set_limits(l.limits());
        assert_eq!(l.admit("t", "c", now), Ok(()));
    }

    #[test]
    fn genesys_defaults() {
        let g = ApiLimits::genesys();
        assert_eq!(g.per_token, Some((300, Duration::from_secs(60))));
        assert_eq!(g.per_client, Some((3_000, Duration::from_secs(60))));
        assert_eq!(g.per_org, None);
        assert_eq!(ApiLimits::default().per_token, None);
    }
}
