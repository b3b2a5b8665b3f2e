//! The fault matrix: every way the token endpoint can misbehave, with 1 and with 1,000
//! concurrent callers, with no token cached and with a still-valid token cached (inside its
//! refresh window, so a refresh is attempted), over loopback against `genesys-fake`.
//!
//! For every cell: no panic; every caller gets a response or a typed `AuthError` within
//! [`CALLER_BOUND`]; token requests stay within one per backoff window (not one per
//! caller); with a valid token cached every caller succeeds; once the fault clears the next
//! refresh succeeds and callers recover without a restart.
//!
//! `docs/reliability.md` and the README's reliability section hold the matrix as a table;
//! `reliability_doc_matches_the_matrix` and `readme_matches_the_matrix` fail if either drifts
//! from [`FAULTS`] (run with `UPDATE_RELIABILITY_DOC=1` to rewrite them).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{base, get, h1_client, h2_client, stack, Stack, Toggle};
use genesys_auth_layer::parse::MAX_TOKEN_LIFETIME;
use genesys_auth_layer::{AuthError, GenesysAuth, InvalidTokenResponse, OAuthErrorCode};
use genesys_fake::{FakeGenesys, TokenFault};
use http::StatusCode;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::BoxError;

/// One token request, body included, may take this long. Generous, because the whole matrix
/// runs at once on a 2-core machine that may be busy with other work: a healthy token request
/// (the first token, the one after the fault clears) must never run into it. Only the hang
/// and drip cells wait it out.
const FETCH_TIMEOUT: Duration = Duration::from_secs(6);
/// First backoff after a failure (equal jitter: the wait is between half and all of it).
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest backoff, and the cap on an honoured `Retry-After`: the 429 cells' 6 s fit under it.
const BACKOFF_MAX: Duration = Duration::from_secs(6);
/// Every caller gets its answer within the fetch timeout plus this much scheduling slack:
/// room for a 1,000-caller burst on a loaded machine, yet less than a second fetch timeout,
/// so a caller that waited out two timeouts in a row still breaks the bound.
const SLACK: Duration = Duration::from_secs(5);
const CALLER_BOUND: Duration = FETCH_TIMEOUT.saturating_add(SLACK);
/// How long a cell polls for something that must happen (a refresh starting, its error being
/// recorded, the backoff ending, a newer token) before it fails. Only spent if the behaviour
/// is broken: each poll ends as soon as its condition holds.
const PATIENCE: Duration = Duration::from_secs(60);
/// Lifetime of tokens in the "token cached" cells: the refresh window opens at half of it.
const WARM_LIFETIME: Duration = Duration::from_secs(16);
/// A "token cached" burst starts only while its token stays valid at least this long (the
/// burst must end before the token expires).
const BURST_ROOM: Duration = Duration::from_secs(5);
/// The 1,000-caller "token cached" cells start at least this far apart, so that each one's
/// burst meets its token inside the refresh window although the bursts take turns (further
/// apart when bursts take longer: see [`Lanes::admit_warm`]).
const WARM_STAGGER: Duration = Duration::from_millis(350);
/// A "token cached" cell whose burst could not start inside its token's refresh window (the
/// bursts ahead of it took longer than the window, on a loaded machine) starts again with a
/// fresh harness, up to this many times in all.
const WARM_ATTEMPTS: u32 = 5;

/// At most two 1,000-caller bursts run at the same moment: one in the lane reserved for
/// the bursts of "token cached" cells (which must happen inside the refresh window), one
/// in the lane for every other burst.
struct Lanes {
    warm: Semaphore,
    other: Semaphore,
    /// When the next 1,000-caller "token cached" cell may take its first token.
    warm_gate: tokio::sync::Mutex<Instant>,
    /// How long the latest burst in a lane took.
    last_burst: std::sync::Mutex<Duration>,
    /// "Token cached" attempts that missed their window and ran again (reported, not a
    /// failure: see [`WARM_ATTEMPTS`]).
    missed_windows: AtomicUsize,
}

impl Lanes {
    /// Waits for the turn of the next 1,000-caller "token cached" cell to take its first
    /// token: [`WARM_STAGGER`] after the one before, or as long as the latest burst took if
    /// that is longer. Their bursts take turns in one lane, so on a busy machine, where a
    /// burst takes seconds, cells that started faster than the lane serves them would only
    /// miss their refresh windows.
    async fn admit_warm(&self) {
        let mut next = self.warm_gate.lock().await;
        tokio::time::sleep_until(*next).await;
        let pace = WARM_STAGGER.max(*self.last_burst.lock().unwrap());
        *next = Instant::now() + pace;
    }

    /// A burst in a lane took `took`.
    fn record(&self, took: Duration) {
        *self.last_burst.lock().unwrap() = took;
    }
}

const ID: &str = "matrix-client";
const SECRET: &str = "matrix-secret";
const PATH: &str = "/api/v2/organizations/me";

/// How a fault is produced and cleared.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// A `TokenFault` set as the fake's persistent fault.
    Fake(fn(&FakeGenesys) -> TokenFault),
    /// Nothing listens on the token endpoint's port.
    Refused,
    /// The OAuth client is deleted after a token was issued (and, with no token cached,
    /// that token is revoked).
    ClientDeleted,
}

/// When the next token request may go after the failure.
#[derive(Clone, Copy, Debug, PartialEq)]
enum NextAttempt {
    Backoff,
    /// `Retry-After` honoured: the backoff is between these.
    RetryAfter(Duration, Duration),
}

struct FaultCase {
    /// The row's first column.
    name: &'static str,
    fault: Fault,
    /// What every caller gets with no token cached (the row's second column).
    outcome: &'static str,
    /// Checks the failure; `None`: the answer is accepted.
    expect: Option<fn(&AuthError) -> bool>,
    next: NextAttempt,
}

fn status_500(e: &AuthError) -> bool {
    matches!(e, AuthError::UnexpectedStatus { status, .. } if *status == 500) && !e.is_fatal()
}
fn status_502(e: &AuthError) -> bool {
    matches!(e, AuthError::UnexpectedStatus { status, .. } if *status == 502) && !e.is_fatal()
}
fn status_503(e: &AuthError) -> bool {
    matches!(e, AuthError::UnexpectedStatus { status, .. } if *status == 503) && !e.is_fatal()
}
fn status_401(e: &AuthError) -> bool {
    matches!(e, AuthError::UnexpectedStatus { status, .. } if *status == 401)
        && e.is_client_rejected()
        && e.is_fatal()
}

fn body_missing(_: &FakeGenesys) -> TokenFault {
    TokenFault::Body(r#"{"token_type":"bearer","expires_in":3600}"#.into())
}
fn body_mac(_: &FakeGenesys) -> TokenFault {
    TokenFault::Body(r#"{"access_token":"m4c-t0ken","token_type":"mac","expires_in":3600}"#.into())
}
fn body_crlf(_: &FakeGenesys) -> TokenFault {
    TokenFault::Body(
        "{\"access_token\":\"crlf-t0ken\\r\\nX-Injected: 1\",\"token_type\":\"bearer\",\"expires_in\":3600}"
            .into(),
    )
}
fn body_zero(_: &FakeGenesys) -> TokenFault {
    TokenFault::Body(r#"{"access_token":"zero-t0ken","token_type":"bearer","expires_in":0}"#.into())
}
fn body_negative(_: &FakeGenesys) -> TokenFault {
    TokenFault::Body(r#"{"access_token":"neg-t0ken","token_type":"bearer","expires_in":-1}"#.into())
}
fn body_abc(_: &FakeGenesys) -> TokenFault {
    TokenFault::Body(
        r#"{"access_token":"abc-t0ken","token_type":"bearer","expires_in":"abc"}"#.into(),
    )
}
fn body_none(_: &FakeGenesys) -> TokenFault {
    TokenFault::Body(r#"{"access_token":"none-t0ken","token_type":"bearer"}"#.into())
}
/// A token the fake's API accepts, with an absurd lifetime.
fn body_huge(fake: &FakeGenesys) -> TokenFault {
    TokenFault::Body(format!(
        r#"{{"access_token":"{}","token_type":"bearer","expires_in":1000000000000}}"#,
        fake.issue_token()
    ))
}

/// The matrix. Each row of `docs/reliability.md` is rendered from one entry.
const FAULTS: &[FaultCase] = &[
    FaultCase {
        name: "answers 500",
        fault: Fault::Fake(|_| TokenFault::Status(500)),
        outcome: "`UnexpectedStatus { status: 500 }`",
        expect: Some(status_500),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "answers 502",
        fault: Fault::Fake(|_| TokenFault::Status(502)),
        outcome: "`UnexpectedStatus { status: 502 }`",
        expect: Some(status_502),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "answers 503",
        fault: Fault::Fake(|_| TokenFault::Status(503)),
        outcome: "`UnexpectedStatus { status: 503 }`",
        expect: Some(status_503),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "answers 401 without an OAuth error body",
        fault: Fault::Fake(|_| TokenFault::Status(401)),
        outcome: "`UnexpectedStatus { status: 401 }`, fatal (`is_client_rejected`)",
        expect: Some(status_401),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "hangs past the timeout",
        fault: Fault::Fake(|_| TokenFault::Hang),
        outcome: "`Timeout` after the fetch timeout",
        expect: Some(|e| matches!(e, AuthError::Timeout(d) if *d == FETCH_TIMEOUT)),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "closes the connection",
        fault: Fault::Fake(|_| TokenFault::CloseConnection),
        outcome: "`Transport`",
        expect: Some(|e| matches!(e, AuthError::Transport(_))),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "refuses the connection",
        fault: Fault::Refused,
        outcome: "`Transport`",
        expect: Some(|e| matches!(e, AuthError::Transport(_))),
        next: NextAttempt::Backoff,
    },
    // The 429 cells ask for 6 s: longer than a 1,000-caller burst takes on a loaded machine,
    // so the checks made after the burst (callers now get the same error, at once) run inside it.
    FaultCase {
        name: "429 with `Retry-After: 6`",
        fault: Fault::Fake(|_| TokenFault::RateLimited {
            retry_after: Some("6".into()),
        }),
        outcome: "`RateLimited { retry_after: Some(6s) }`",
        expect: Some(
            |e| matches!(e, AuthError::RateLimited { retry_after: Some(d) } if *d == Duration::from_secs(6)),
        ),
        next: NextAttempt::RetryAfter(Duration::from_secs(3), Duration::from_secs(6)),
    },
    FaultCase {
        name: "429 with an HTTP-date `Retry-After` (now + 6 s)",
        fault: Fault::Fake(|_| TokenFault::RateLimited {
            retry_after: Some(httpdate::fmt_http_date(
                std::time::SystemTime::now() + Duration::from_secs(6),
            )),
        }),
        outcome: "`RateLimited { retry_after: Some(5–6 s) }`",
        // The date has whole seconds, and on a loaded machine seconds may pass between
        // writing it and the layer reading it.
        expect: Some(|e| {
            matches!(e, AuthError::RateLimited { retry_after: Some(d) }
                if *d > Duration::from_secs(2) && *d <= Duration::from_secs(6))
        }),
        next: NextAttempt::RetryAfter(Duration::from_secs(2), Duration::from_secs(6)),
    },
    FaultCase {
        name: "429 without `Retry-After`",
        fault: Fault::Fake(|_| TokenFault::RateLimited { retry_after: None }),
        outcome: "`RateLimited { retry_after: None }`",
        expect: Some(|e| matches!(e, AuthError::RateLimited { retry_after: None })),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "malformed JSON",
        fault: Fault::Fake(|_| TokenFault::MalformedJson),
        outcome: "`InvalidResponse(NotJson)`",
        expect: Some(|e| matches!(e, AuthError::InvalidResponse(InvalidTokenResponse::NotJson))),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "a 10 MiB body",
        fault: Fault::Fake(|_| TokenFault::Oversized(10 * 1024 * 1024)),
        outcome: "`ResponseTooLarge { limit: 65536 }`",
        expect: Some(|e| matches!(e, AuthError::ResponseTooLarge { limit: 65_536 })),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "drips the body a byte a second",
        fault: Fault::Fake(|_| TokenFault::Drip {
            body: r#"{"access_token":"drip","token_type":"bearer","expires_in":3600}"#.into(),
            every: Duration::from_secs(1),
        }),
        outcome: "`Timeout` after the fetch timeout",
        expect: Some(|e| matches!(e, AuthError::Timeout(d) if *d == FETCH_TIMEOUT)),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "omits `access_token`",
        fault: Fault::Fake(body_missing),
        outcome: "`InvalidResponse(MissingAccessToken)`",
        expect: Some(|e| {
            matches!(
                e,
                AuthError::InvalidResponse(InvalidTokenResponse::MissingAccessToken)
            )
        }),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "`token_type: mac`",
        fault: Fault::Fake(body_mac),
        outcome: "`InvalidResponse(UnsupportedTokenType(\"mac\"))`",
        expect: Some(
            |e| matches!(e, AuthError::InvalidResponse(InvalidTokenResponse::UnsupportedTokenType(t)) if t == "mac"),
        ),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "a token with CR/LF in it",
        fault: Fault::Fake(body_crlf),
        outcome: "`InvalidResponse(InvalidAccessToken)`",
        expect: Some(|e| {
            matches!(
                e,
                AuthError::InvalidResponse(InvalidTokenResponse::InvalidAccessToken)
            )
        }),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "`expires_in: 0`",
        fault: Fault::Fake(body_zero),
        outcome: "`InvalidResponse(InvalidExpiresIn(\"0\"))`",
        expect: Some(
            |e| matches!(e, AuthError::InvalidResponse(InvalidTokenResponse::InvalidExpiresIn(v)) if v == "0"),
        ),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "`expires_in: -1`",
        fault: Fault::Fake(body_negative),
        outcome: "`InvalidResponse(InvalidExpiresIn(\"-1\"))`",
        expect: Some(
            |e| matches!(e, AuthError::InvalidResponse(InvalidTokenResponse::InvalidExpiresIn(v)) if v == "-1"),
        ),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "`expires_in: 1000000000000`",
        fault: Fault::Fake(body_huge),
        outcome: "the token, its lifetime clamped to 48 h",
        expect: None,
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "`expires_in: \"abc\"`",
        fault: Fault::Fake(body_abc),
        outcome: "`InvalidResponse(InvalidExpiresIn(\"\\\"abc\\\"\"))`",
        expect: Some(
            |e| matches!(e, AuthError::InvalidResponse(InvalidTokenResponse::InvalidExpiresIn(v)) if v == "\"abc\""),
        ),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "no `expires_in`",
        fault: Fault::Fake(body_none),
        outcome: "`InvalidResponse(MissingExpiresIn)`",
        expect: Some(|e| {
            matches!(
                e,
                AuthError::InvalidResponse(InvalidTokenResponse::MissingExpiresIn)
            )
        }),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "`invalid_client` after having worked (client deleted)",
        fault: Fault::ClientDeleted,
        outcome: "`OAuth { status: 401, code: invalid_client }`, fatal",
        expect: Some(|e| {
            matches!(e, AuthError::OAuth { status, code: OAuthErrorCode::InvalidClient, .. } if *status == 401)
                && e.is_fatal()
        }),
        next: NextAttempt::Backoff,
    },
    FaultCase {
        name: "`invalid_scope`",
        fault: Fault::Fake(|_| TokenFault::OAuthError {
            status: 400,
            error: "invalid_scope".into(),
            description: "scope not allowed".into(),
        }),
        outcome: "`OAuth { status: 400, code: invalid_scope }`, fatal",
        expect: Some(|e| {
            matches!(e, AuthError::OAuth { status, code: OAuthErrorCode::InvalidScope, description: Some(d) }
                if *status == 400 && d == "scope not allowed")
                && e.is_fatal()
        }),
        next: NextAttempt::Backoff,
    },
];

// ---------------------------------------------------------------------------------------
// The table in docs/reliability.md
// ---------------------------------------------------------------------------------------

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reliability.md");
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
const BEGIN: &str = "<!-- fault-matrix:begin (checked by tests/fault_matrix.rs) -->";
const END: &str = "<!-- fault-matrix:end -->";

fn render_table() -> String {
    let mut table = String::from(
        "| the token endpoint … | no token cached: every caller gets ¹ | token cached: callers | token requests | next attempt | once it clears |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for case in FAULTS {
        let warm = match case.expect {
            Some(_) => "all succeed with the cached token",
            None => "all succeed; the refresh stores the clamped token",
        };
        let next = match (case.expect, case.next) {
            (None, _) => "—",
            (Some(_), NextAttempt::Backoff) => "after the backoff",
            (Some(_), NextAttempt::RetryAfter(..)) => "after `Retry-After`",
        };
        table.push_str(&format!(
            "| {} | {} | {} | ≤ 1 per backoff window | {} | next refresh succeeds, callers recover |\n",
            case.name, case.outcome, warm, next
        ));
    }
    table
}

#[test]
fn reliability_doc_matches_the_matrix() {
    check_table_in(DOC);
}

#[test]
fn readme_matches_the_matrix() {
    check_table_in(README);
}

/// Fails if the table between the markers in `path` is not the one rendered from
/// [`FAULTS`]; with `UPDATE_RELIABILITY_DOC` set, rewrites it instead.
fn check_table_in(path: &str) {
    let doc = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (Some(begin), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!("{path} lacks the markers {BEGIN:?} … {END:?}");
    };
    let table = render_table();
    let current = doc[begin + BEGIN.len()..end].trim();
    if current == table.trim() {
        return;
    }
    if std::env::var_os("UPDATE_RELIABILITY_DOC").is_some() {
        let updated = format!("{}{BEGIN}\n{table}{}", &doc[..begin], &doc[end..]);
        std::fs::write(path, updated).unwrap_or_else(|e| panic!("write {path}: {e}"));
        return;
    }
    panic!(
        "{path}'s fault matrix differs from the faults tests/fault_matrix.rs runs; \
         rerun with UPDATE_RELIABILITY_DOC=1 to rewrite it. Expected:\n{table}"
    );
}

// ---------------------------------------------------------------------------------------
// Running one cell
// ---------------------------------------------------------------------------------------

struct Harness {
    fake: FakeGenesys,
    toggle: Option<Toggle>,
    auth: GenesysAuth,
    client: Stack,
    api: String,
}

async fn harness(case: &FaultCase, lifetime: Duration) -> Harness {
    let fake = FakeGenesys::builder()
        .client(ID, SECRET)
        .token_lifetime(lifetime)
        .start()
        .await
        .expect("fake");
    let toggle = match case.fault {
        Fault::Refused => Some(Toggle::new(fake.login_addr().expect("login addr")).await),
        _ => None,
    };
    let login = toggle
        .as_ref()
        .map_or_else(|| base(&fake.login_uri()), Toggle::base);
    let api = base(&fake.api_uri());
    let auth = GenesysAuth::client_credentials(ID, SECRET)
        .login_uri(login)
        .api_uri(api.as_str())
        .fetch_timeout(FETCH_TIMEOUT)
        .backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        // The window is capped at half the lifetime: refresh starts at exactly half of it.
        .refresh_ahead(Duration::from_secs(3_600), 0.0)
        .build(h1_client())
        .expect("auth");
    let client = stack(&auth, h2_client());
    Harness {
        fake,
        toggle,
        auth,
        client,
        api,
    }
}

impl Harness {
    async fn apply(&self, case: &FaultCase, cached: bool) {
        match case.fault {
            Fault::Fake(make) => self.fake.set_persistent_token_fault(Some(make(&self.fake))),
            Fault::Refused => self.toggle.as_ref().expect("toggle").down().await,
            Fault::ClientDeleted => {
                self.fake.delete_client();
                if !cached {
                    // No valid token: the one issued before is refused by the API.
                    self.fake.revoke_all_tokens();
                }
            }
        }
    }

    async fn clear(&self, case: &FaultCase) {
        match case.fault {
            Fault::Fake(_) => self.fake.set_persistent_token_fault(None),
            Fault::Refused => self.toggle.as_ref().expect("toggle").up().await,
            Fault::ClientDeleted => self.fake.restore_client(),
        }
    }

    fn requests(&self) -> u64 {
        self.auth.stats().refreshes
    }

    async fn backoff_over(&self) -> bool {
        common::eventually(PATIENCE, || async {
            self.auth.health().backoff_remaining.is_none()
        })
        .await
    }
}

type Answer = (Result<StatusCode, BoxError>, Duration);

/// `n` concurrent callers through the full stack; each answer with its latency, and the
/// burst's duration.
async fn burst(client: &Stack, api: &str, n: usize) -> (Vec<Answer>, Duration) {
    use tower::ServiceExt;
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            let request = get(api, PATH);
            tokio::spawn(async move {
                let answer = tokio::time::timeout(Duration::from_secs(20), client.oneshot(request))
                    .await
                    .unwrap_or_else(|_| Err("no answer within 20 s: a caller hangs".into()));
                (answer.map(|r| r.status()), start.elapsed())
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for task in tasks {
        answers.push(match task.await {
            Ok(answer) => answer,
            Err(e) => (
                Err(format!("caller task failed: {e}").into()),
                start.elapsed(),
            ),
        });
    }
    if n > 1 && std::env::var_os("MATRIX_VERBOSE").is_some() {
        eprintln!("burst of {n}: {:?}", start.elapsed());
    }
    (answers, start.elapsed())
}

/// At most one token request per backoff window (equal jitter: at least half the initial
/// backoff) during `elapsed`, plus the first.
fn request_bound(elapsed: Duration) -> u64 {
    1 + (elapsed.as_millis() / (BACKOFF_INITIAL / 2).as_millis()) as u64
}

/// Checks every answer succeeded within the bound; returns failure descriptions.
fn all_succeed(what: &str, answers: &[Answer], failures: &mut Vec<String>) {
    for (i, (result, took)) in answers.iter().enumerate() {
        match result {
            Ok(status) if *status == StatusCode::OK => {}
            Ok(status) => failures.push(format!("{what}: caller {i} got HTTP {status}")),
            Err(e) => failures.push(format!("{what}: caller {i} failed: {e}")),
        }
        if *took > CALLER_BOUND {
            failures.push(format!(
                "{what}: caller {i} took {took:?} > {CALLER_BOUND:?}"
            ));
            break;
        }
    }
}

macro_rules! check {
    ($failures:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            $failures.push(format!($($msg)+));
        }
    };
}

/// No token cached: every caller gets the typed error, within the bound, from one token
/// request per backoff window; once the fault clears, the next refresh succeeds.
async fn cold(case: &'static FaultCase, n: usize, lanes: &Lanes) -> Vec<String> {
    let mut f = Vec::new();
    let h = harness(case, Duration::from_secs(3_600)).await;
    if matches!(case.fault, Fault::ClientDeleted) {
        h.auth
            .token()
            .await
            .expect("a token while the client exists");
    }
    // The lanes share out the CPU; a burst that waits out the fetch timeout needs little of
    // it, and holding a lane for the whole timeout would stall every other cell's burst.
    let mut permit = if n > 1 && !case.outcome.starts_with("`Timeout`") {
        lanes.other.acquire().await.ok()
    } else {
        None
    };
    h.apply(case, false).await;
    let before = h.requests();
    let (answers, elapsed) = burst(&h.client, &h.api, n).await;
    if permit.take().is_some() {
        lanes.record(elapsed);
    }
    let requests = h.requests() - before;

    for (i, (result, took)) in answers.iter().enumerate() {
        check!(
            f,
            *took <= CALLER_BOUND,
            "caller {i} took {took:?} > {CALLER_BOUND:?}"
        );
        match (case.expect, result) {
            (Some(expect), Err(e)) => match common::auth_error(e) {
                Some(err) => check!(f, expect(err), "caller {i}: unexpected error {err:?}"),
                None => f.push(format!("caller {i}: not an AuthError: {e}")),
            },
            (Some(_), Ok(status)) => {
                f.push(format!("caller {i}: HTTP {status}, expected an error"))
            }
            (None, Ok(status)) => check!(f, *status == StatusCode::OK, "caller {i}: HTTP {status}"),
            (None, Err(e)) => f.push(format!("caller {i}: {e}")),
        }
        if f.len() > 5 {
            break;
        }
    }
    check!(
        f,
        requests >= 1 && requests <= request_bound(elapsed),
        "{requests} token requests for {n} callers in {elapsed:?} (bound {})",
        request_bound(elapsed)
    );
    check!(
        f,
        h.fake.token_requests() <= h.requests(),
        "the fake saw {} token requests, the cache sent {}",
        h.fake.token_requests(),
        h.requests()
    );

    match case.expect {
        Some(expect) => {
            let health = h.auth.health();
            let last = health.last_error.as_ref();
            check!(f, last.is_some_and(expect), "health.last_error {last:?}");
            if let NextAttempt::RetryAfter(_, hi) = case.next {
                // The server's delay is the backoff: callers now get the same error at once,
                // with no token request.
                let remaining = health.backoff_remaining;
                check!(
                    f,
                    remaining.is_some_and(|r| r <= hi),
                    "backoff remaining {remaining:?}, expected Retry-After ≤ {hi:?}"
                );
                let requests = h.fake.token_requests();
                let err = h.auth.token().await.err();
                check!(
                    f,
                    err.as_ref().is_some_and(expect) && h.fake.token_requests() == requests,
                    "during Retry-After: {err:?}, token requests {requests} → {}",
                    h.fake.token_requests()
                );
            }
        }
        None => {
            let token = h.auth.cache().current().expect("the clamped token");
            check!(
                f,
                token.expires_at() - token.requested_at() == MAX_TOKEN_LIFETIME,
                "lifetime {:?}, expected it clamped to 48 h",
                token.expires_at() - token.requested_at()
            );
        }
    }

    // The fault clears: after the backoff, one refresh and every caller recovers.
    h.clear(case).await;
    check!(f, h.backoff_over().await, "backoff never ended");
    let before = h.requests();
    let mut permit = if n > 1 {
        lanes.other.acquire().await.ok()
    } else {
        None
    };
    let (answers, took) = burst(&h.client, &h.api, n).await;
    if permit.take().is_some() {
        lanes.record(took);
    }
    all_succeed("after the fault cleared", &answers, &mut f);
    let requests = h.requests() - before;
    check!(f, requests <= 1, "{requests} token requests to recover");
    f
}

/// A valid token cached, in its refresh window: every caller keeps succeeding while the
/// refresh fails; once the fault clears, a later request's refresh succeeds.
async fn warm(case: &'static FaultCase, n: usize, lanes: &Lanes) -> Vec<String> {
    for _ in 0..WARM_ATTEMPTS {
        if n > 1 {
            lanes.admit_warm().await;
        }
        if let Some(failures) = warm_attempt(case, n, lanes).await {
            return failures;
        }
        lanes.missed_windows.fetch_add(1, Ordering::Relaxed);
    }
    vec![format!(
        "harness: the burst missed its token's refresh window {WARM_ATTEMPTS} times \
         (raise WARM_LIFETIME)"
    )]
}

/// One try at a "token cached" cell; `None` if its burst could not start while the cached
/// token still had [`BURST_ROOM`] left, before anything was checked.
async fn warm_attempt(case: &'static FaultCase, n: usize, lanes: &Lanes) -> Option<Vec<String>> {
    let mut f = Vec::new();
    let h = harness(case, WARM_LIFETIME).await;
    if let Fault::Refused = case.fault {
        h.toggle.as_ref().expect("toggle").up().await;
    }
    let token = h.auth.token().await.expect("the first token");
    // The fault is in place before the refresh window opens, so the refresh meets it
    // whether a request or a timer starts it.
    h.apply(case, true).await;
    let before = h.requests();
    tokio::time::sleep_until(token.refresh_at() + Duration::from_millis(20)).await;
    let mut permit = if n > 1 {
        lanes.warm.acquire().await.ok()
    } else {
        None
    };
    if Instant::now() + BURST_ROOM > token.expires_at() {
        return None;
    }
    // Again, for faults that depend on the time (an HTTP-date `Retry-After`).
    h.apply(case, true).await;
    let (answers, took) = burst(&h.client, &h.api, n).await;
    if permit.take().is_some() {
        lanes.record(took);
    }
    all_succeed("with a valid token cached", &answers, &mut f);
    // A request inside the window starts the refresh; on a busy machine the burst can end
    // before the window opens. Traffic goes on, as it would in production, until the
    // refresh has started: every request must still succeed, and the count stays exact.
    let deadline = Instant::now() + PATIENCE;
    while h.requests() == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (answers, _) = burst(&h.client, &h.api, 1).await;
        all_succeed("with a valid token cached", &answers, &mut f);
    }
    let started = h.requests() > before;
    let elapsed = Instant::now().saturating_duration_since(token.refresh_at());
    let requests = h.requests() - before;
    check!(
        f,
        started && requests <= request_bound(elapsed),
        "{requests} token requests for {n} callers in the {elapsed:?} since the refresh window opened (bound {})",
        request_bound(elapsed)
    );

    match case.expect {
        Some(expect) => {
            let failed = common::eventually(PATIENCE, || async {
                let last = h.auth.health().last_error;
                last.as_ref().is_some_and(expect)
            })
            .await;
            let last = h.auth.health().last_error;
            check!(f, failed, "the background refresh's error: {last:?}");
            let current = h.auth.cache().current().map(|t| t.generation().0);
            check!(
                f,
                current == Some(1),
                "cached generation {current:?}, expected 1"
            );
        }
        None => {
            let refreshed = common::eventually(PATIENCE, || async {
                h.auth
                    .cache()
                    .current()
                    .is_some_and(|t| t.generation().0 == 2)
            })
            .await;
            let token = h.auth.cache().current().expect("a token");
            check!(
                f,
                refreshed && token.expires_at() - token.requested_at() == MAX_TOKEN_LIFETIME,
                "generation {:?}, lifetime {:?}: expected 2 with 48 h",
                token.generation(),
                token.expires_at() - token.requested_at()
            );
        }
    }

    // The fault clears: a request after the backoff starts the refresh, which succeeds.
    h.clear(case).await;
    check!(f, h.backoff_over().await, "backoff never ended");
    let recovered = common::eventually(PATIENCE, || async {
        let (answers, _) = burst(&h.client, &h.api, 1).await;
        all_succeed("while recovering", &answers, &mut Vec::new());
        h.auth
            .cache()
            .current()
            .is_some_and(|t| t.generation().0 > 1)
    })
    .await;
    check!(
        f,
        recovered,
        "no newer token within {PATIENCE:?} of the fault clearing"
    );
    let mut permit = if n > 1 {
        lanes.other.acquire().await.ok()
    } else {
        None
    };
    let (answers, took) = burst(&h.client, &h.api, n).await;
    if permit.take().is_some() {
        lanes.record(took);
    }
    all_succeed("after the fault cleared", &answers, &mut f);
    Some(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix() {
    let lanes = Arc::new(Lanes {
        warm: Semaphore::new(1),
        other: Semaphore::new(1),
        warm_gate: tokio::sync::Mutex::new(Instant::now()),
        last_burst: std::sync::Mutex::default(),
        missed_windows: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let mut cells = tokio::task::JoinSet::new();
    for case in FAULTS {
        for callers in [1, 1_000] {
            for cached in [false, true] {
                let lanes = lanes.clone();
                let label = format!(
                    "[{} | {callers} caller(s) | {}]",
                    case.name,
                    if cached { "token cached" } else { "no token" }
                );
                cells.spawn(async move {
                    let t = Instant::now();
                    let result = tokio::spawn(async move {
                        if cached {
                            warm(case, callers, &lanes).await
                        } else {
                            cold(case, callers, &lanes).await
                        }
                    })
                    .await
                    .unwrap_or_else(|e| vec![format!("panicked: {e}")]);
                    (label, result, t.elapsed())
                });
            }
        }
    }
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut count = 0;
    while let Some(done) = cells.join_next().await {
        let (label, result, took) = done.expect("cell task");
        count += 1;
        slowest = slowest.max(took);
        failures.extend(result.into_iter().map(|f| format!("{label} {f}")));
    }
    eprintln!(
        "fault matrix: {count} cells in {:?} (slowest cell {slowest:?}; {} \"token cached\" \
         attempts missed their refresh window and ran again)",
        started.elapsed(),
        lanes.missed_windows.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
