//! Shared state of one fake: knobs, counters, issued tokens, recorded requests.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use tokio::time::Instant;

use crate::limit::{ApiLimitScope, ApiLimiter, Refused};
use crate::{ApiFault, ApiLimits, TokenFault};

/// At most this many API requests are kept for [`crate::FakeGenesys::recorded_api_requests`].
pub(crate) const MAX_RECORDED: usize = 100_000;

/// One request the API host answered, as recorded before answering.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The request method.
    pub method: http::Method,
    /// Path and query, e.g. `/api/v2/echo?x=1`.
    pub path: String,
    /// Every request header, as received.
    pub headers: http::HeaderMap,
    /// The full request body (empty if it was over the 16 MiB cap or could not be read).
    pub body: Bytes,
    /// The request's trailers, if it sent any (HTTP/2, or HTTP/1.1 chunked).
    pub trailers: Option<http::HeaderMap>,
    /// The status the fake answered with.
    pub status: u16,
}

pub(crate) struct ClientState {
    pub(crate) id: String,
    pub(crate) primary: String,
    pub(crate) secondary: Option<String>,
    pub(crate) deleted: bool,
}

#[derive(Default)]
pub(crate) struct RateState {
    pub(crate) limit: Option<(u32, Duration)>,
    pub(crate) window_end: Option<Instant>,
    pub(crate) count: u32,
}

#[derive(Default)]
pub(crate) struct FaultState {
    pub(crate) queue: VecDeque<TokenFault>,
    pub(crate) persistent: Option<TokenFault>,
}

/// What the fake knows about a token it issued.
pub(crate) struct IssuedToken {
    expires_at: Instant,
    /// The OAuth client it was issued to (the key of [`ApiLimits::per_client`]).
    client_id: Arc<str>,
}

pub(crate) struct Inner {
    pub(crate) client: Mutex<ClientState>,
    pub(crate) token_lifetime: AtomicU64,
    pub(crate) token_latency: AtomicU64,
    pub(crate) api_latency: AtomicU64,
    pub(crate) rate: Mutex<RateState>,
    pub(crate) faults: Mutex<FaultState>,
    pub(crate) api_limiter: Mutex<ApiLimiter>,
    pub(crate) api_faults: Mutex<VecDeque<ApiFault>>,
    pub(crate) tokens: RwLock<HashMap<String, IssuedToken>>,
    pub(crate) recorded: Mutex<VecDeque<RecordedRequest>>,
    pub(crate) token_requests: AtomicU64,
    pub(crate) tokens_issued: AtomicU64,
    pub(crate) api_requests: AtomicU64,
    pub(crate) api_unauthorized: AtomicU64,
    /// API requests refused by the limits.
    pub(crate) api_rate_limited: AtomicU64,
    /// Refusals by scope, indexed by [`ApiLimitScope::index`].
    pub(crate) api_rate_limited_by: [AtomicU64; 3],
    pub(crate) api_faults_answered: AtomicU64,
    pub(crate) connections: AtomicU64,
    token_counter: AtomicU64,
    correlation_counter: AtomicU64,
    hasher: RandomState,
    pub(crate) org_id: String,
    /// Codes, refresh tokens and users of the person-facing grants.
    pub(crate) login: crate::login::LoginState,
}

/// Locks a mutex, ignoring poisoning (state stays usable after a panicking test thread).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

impl Inner {
    pub(crate) fn new(
        id: String,
        secret: String,
        lifetime: Duration,
        token_latency: Duration,
        api_latency: Duration,
        rate_limit: Option<(u32, Duration)>,
        api_limits: ApiLimits,
    ) -> Self {
        let hasher = RandomState::new();
        let a = hasher.hash_one(("org", 1u8)).to_le_bytes();
        let b = hasher.hash_one(("org", 2u8)).to_le_bytes();
        let hex: String = a
            .iter()
            .chain(b.iter())
            .map(|x| format!("{x:02x}"))
            .collect();
        let org_id = format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        );
        Inner {
            client: Mutex::new(ClientState {
                id,
                primary: secret,
                secondary: None,
                deleted: false,
            }),
            token_lifetime: AtomicU64::new(nanos(lifetime)),
            token_latency: AtomicU64::new(nanos(token_latency)),
            api_latency: AtomicU64::new(nanos(api_latency)),
            rate: Mutex::new(RateState {
                limit: rate_limit,
                ..RateState::default()
            }),
            faults: Mutex::new(FaultState::default()),
            api_limiter: Mutex::new(ApiLimiter::new(api_limits)),
            api_faults: Mutex::new(VecDeque::new()),
            tokens: RwLock::new(HashMap::new()),
            recorded: Mutex::new(VecDeque::new()),
            token_requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            api_requests: AtomicU64::new(0),
            api_unauthorized: AtomicU64::new(0),
            api_rate_limited: AtomicU64::new(0),
            api_rate_limited_by: Default::default(),
            api_faults_answered: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            token_counter: AtomicU64::new(0),
            correlation_counter: AtomicU64::new(0),
            hasher,
            org_id,
            login: crate::login::LoginState::default(),
        }
    }

    pub(crate) fn duration(a: &AtomicU64) -> Duration {
        Duration::from_nanos(a.load(Ordering::Relaxed))
    }

    /// The next fault to apply: the queue first, then the persistent one.
    pub(crate) fn next_fault(&self) -> Option<TokenFault> {
        let mut f = lock(&self.faults);
        match f.queue.pop_front() {
            Some(fault) => Some(fault),
            None => f.persistent.clone(),
        }
    }

    /// `None` if the request may proceed, else the `Retry-After` seconds.
    pub(crate) fn check_rate(&self) -> Option<u64> {
        let mut r = lock(&self.rate);
        let (limit, per) = r.limit?;
        let now = Instant::now();
        let end = match r.window_end {
            Some(end) if now < end => end,
            _ => {
                let end = now.checked_add(per).unwrap_or_else(crate::body::far_future);
                r.window_end = Some(end);
                r.count = 0;
                end
            }
        };
        if r.count >= limit {
            Some(ceil_secs(end - now).max(1))
        } else {
            r.count += 1;
            None
        }
    }

    /// The next queued API fault, if any.
    pub(crate) fn next_api_fault(&self) -> Option<ApiFault> {
        lock(&self.api_faults).pop_front()
    }

    /// Admits an API request carrying a valid `token` issued to `client`, or refuses it
    /// and counts the refusal.
    pub(crate) fn admit_api(&self, token: &str, client: &str) -> Result<(), Refused> {
        let decision = lock(&self.api_limiter).admit(token, client, Instant::now());
        if let Err(refused) = &decision {
            self.api_rate_limited.fetch_add(1, Ordering::Relaxed);
            for scope in &refused.scopes {
                self.api_rate_limited_by[scope.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
        decision
    }

    pub(crate) fn api_rate_limited_by(&self, scope: ApiLimitScope) -> &AtomicU64 {
        &self.api_rate_limited_by[scope.index()]
    }

    /// A new unique id in UUID form (8-4-4-4-12 lowercase hex), for
    /// `ININ-Correlation-Id`: a hash of a counter, then the counter itself, so no two
    /// ids of one fake are equal.
    pub(crate) fn new_correlation_id(&self) -> String {
        let n = self.correlation_counter.fetch_add(1, Ordering::Relaxed);
        let h = self.hasher.hash_one(("correlation", n));
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            h >> 32,
            (h >> 16) & 0xffff,
            h & 0xffff,
            n >> 48,
            n & 0xffff_ffff_ffff
        )
    }

    /// A new unique, URL-safe token (54 characters).
    pub(crate) fn new_token_string(&self) -> String {
        let n = self.token_counter.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(40);
        for i in 0..4u64 {
            bytes.extend_from_slice(&self.hasher.hash_one((n, i)).to_le_bytes());
        }
        bytes.extend_from_slice(&n.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Issues (stores) a new token; returns it with its lifetime.
    pub(crate) fn issue_token(&self) -> (String, Duration) {
        let lifetime = Self::duration(&self.token_lifetime);
        let token = self.new_token_string();
        let client_id: Arc<str> = lock(&self.client).id.as_str().into();
        let now = Instant::now();
        let expires_at = now
            .checked_add(lifetime)
            .unwrap_or_else(crate::body::far_future);
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        if tokens.len() >= 100_000 {
            tokens.retain(|_, t| t.expires_at > now);
        }
        tokens.insert(
            token.clone(),
            IssuedToken {
                expires_at,
                client_id,
            },
        );
        (token, lifetime)
    }

    pub(crate) fn token_valid(&self, token: &str) -> bool {
        self.token_client(token).is_some()
    }

    /// The client a token was issued to, if the token is valid now.
    pub(crate) fn token_client(&self, token: &str) -> Option<Arc<str>> {
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        tokens
            .get(token)
            .filter(|t| Instant::now() < t.expires_at)
            .map(|t| t.client_id.clone())
    }

    pub(crate) fn revoke(&self, token: &str) {
        self.tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(token);
    }

    pub(crate) fn revoke_all(&self) {
        self.tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Does this id/secret pair authenticate the (not deleted) client?
    pub(crate) fn client_ok(&self, id: &str, secret: &str) -> bool {
        let c = lock(&self.client);
        !c.deleted && c.id == id && (c.primary == secret || c.secondary.as_deref() == Some(secret))
    }

    pub(crate) fn record(&self, req: RecordedRequest) {
        let mut rec = lock(&self.recorded);
        if rec.len() >= MAX_RECORDED {
            rec.pop_front();
        }
        rec.push_back(req);
    }
}
