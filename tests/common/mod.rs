//! Helpers shared by the integration tests (`integration`, `rotation`, `observability`,
//! `fault_matrix`, `secrets`, `stress`). Each test binary uses a different subset.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use genesys_auth_layer::{AuthError, GenesysAuth};
use genesys_fake::FakeGenesys;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;
/// The full stack with the response body collected.
pub type Stack = BoxCloneSyncService<Request<Full<Bytes>>, Response<Bytes>, BoxError>;

/// HTTP/1.1 client (token requests: a scripted `CloseConnection` closes the connection).
pub fn h1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One HTTP/2 connection (prior knowledge): a thousand concurrent API requests use one
/// socket.
///
/// No cap on streams the client resets itself: a replayed 401's stream is cancelled, and h2
/// forgets a cancelled stream after a second, so on a busy machine the fake's late frames
/// for thousands of them each count as a local error reset. Past h2's default cap (1,024)
/// the client would end the connection with `GOAWAY(ENHANCE_YOUR_CALM)` and fail every
/// request on it. The cap guards against a hostile server; this one is the fake.
pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_max_concurrent_reset_streams(100_000)
        .http2_max_local_error_reset_streams(None)
        .build_http()
}

/// `http://127.0.0.1:PORT` without the trailing slash `Uri`'s `Display` adds.
pub fn base(uri: &http::Uri) -> String {
    uri.to_string().trim_end_matches('/').to_owned()
}

/// The full stack (`auth.layers()`: auth and replay in one service) over `inner`, bodies
/// collected.
pub fn stack<S, B>(auth: &GenesysAuth, inner: S) -> Stack
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    boxed(ServiceBuilder::new().layer(auth.layers()).service(inner))
}

/// The two-layer stack: tower's `Retry` with `RefreshOn401` (`auth.retry_layer()`) outside
/// `auth.layer()`, over `inner`, bodies collected. Behaves as [`stack`].
pub fn tower_stack<S, B>(auth: &GenesysAuth, inner: S) -> Stack
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    boxed(
        ServiceBuilder::new()
            .layer(auth.retry_layer())
            .layer(auth.layer())
            .service(inner),
    )
}

/// Any HTTP service, boxed, with the response body collected.
pub fn boxed<S, B>(service: S) -> Stack
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(service.map_err(Into::into).and_then(
        |response: Response<B>| async move {
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
            Ok(Response::from_parts(parts, bytes))
        },
    ))
}

pub fn get(api_base: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{api_base}{path}"))
        .body(Full::default())
        .expect("request")
}

/// The `AuthError` inside a boxed stack error, if it is one.
pub fn auth_error(err: &BoxError) -> Option<&AuthError> {
    err.downcast_ref::<AuthError>()
}

/// A port on loopback nothing listens on (bound, then released).
pub async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A TCP forwarder on a fixed loopback port that can be switched off (connections are
/// refused) and on again (it forwards to `target`). Used for "the token endpoint refuses
/// the connection" with a fault that can clear.
pub struct Toggle {
    port: u16,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Bound for the toggle's whole life and never listening: it refuses nothing by itself
    /// but keeps the port out of the kernel's hands, so no outgoing connection of another
    /// test takes it as its local port while the toggle is down.
    _reservation: TcpSocket,
}

/// A loopback socket bound to `port` (0: any) that others may bind too (`SO_REUSEPORT`).
fn shared_socket(port: u16) -> TcpSocket {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.set_reuseport(true).expect("SO_REUSEPORT");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("bind the toggle port");
    socket
}

impl Toggle {
    pub async fn new(target: SocketAddr) -> Self {
        let reservation = shared_socket(0);
        Self {
            port: reservation.local_addr().expect("addr").port(),
            target,
            tasks: Arc::default(),
            _reservation: reservation,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts forwarding: a listener joins the reservation on the port.
    pub async fn up(&self) {
        let listener = shared_socket(self.port)
            .listen(1024)
            .expect("listen on the toggle port");
        let target = self.target;
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Stops listening and cuts every forwarded connection: connects are refused.
    pub async fn down(&self) {
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for Toggle {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// A tiny HTTP/1 + h2c server on loopback that records every request's headers and answers
/// with `respond(uri) -> (status, location)`.
pub struct TinyServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<(http::Uri, http::HeaderMap)>>>,
    task: JoinHandle<()>,
}

impl TinyServer {
    pub async fn start<F>(respond: F) -> Self
    where
        F: Fn(&http::Uri) -> (u16, Option<String>) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<(http::Uri, http::HeaderMap)>>> = Arc::default();
        let respond = Arc::new(respond);
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let record = record.clone();
                            let respond = respond.clone();
                            async move {
                                record
                                    .lock()
                                    .unwrap()
                                    .push((req.uri().clone(), req.headers().clone()));
                                let (status, location) = respond(req.uri());
                                let mut res = Response::builder().status(status);
                                if let Some(location) = location {
                                    res = res.header(http::header::LOCATION, location);
                                }
                                Ok::<_, Infallible>(
                                    res.body(Full::new(Bytes::from_static(b"ok"))).unwrap(),
                                )
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every access token the API host of `fake` saw in an `Authorization: Bearer` header.
pub fn tokens_seen_by(fake: &FakeGenesys) -> Vec<String> {
    let mut tokens: Vec<String> = fake
        .recorded_api_requests()
        .iter()
        .filter_map(|r| r.headers.get(http::header::AUTHORIZATION))
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .collect();
    tokens.sort();
    tokens.dedup();
    tokens
}

/// Waits until `cond` holds, polling every 10 ms, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `MakeWriter` that appends everything to a shared buffer.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The captured lines holding `message` (an event's stable name).
    pub fn events(&self, message: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(message))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Where the fake sends the browser back after a login (nothing listens: the tests read the
/// redirect's `Location`).
pub const LOGIN_REDIRECT: &str = "http://127.0.0.1:7/callback";

/// The confidential user grant of the fake's client.
pub fn user_grant(fake: &FakeGenesys) -> genesys_auth_layer::UserGrant<HttpClient> {
    let creds = genesys_auth_layer::Credentials::new(fake.client_id(), fake.client_secret())
        .expect("credentials");
    genesys_auth_layer::UserGrant::confidential(h1_client(), fake.token_url(), creds)
        .expect("grant")
}

/// Logs `user_id` in through the fake's authorize endpoint (auto-approved, as a browser
/// following the redirect would), checks the callback's state and exchanges the code: her
/// tokens.
pub async fn log_in_user(fake: &FakeGenesys, user_id: &str) -> genesys_auth_layer::UserTokens {
    fake.set_auto_approve(Some(user_id));
    let request =
        genesys_auth_layer::AuthorizeUrl::new(fake.login_uri(), fake.client_id(), LOGIN_REDIRECT)
            .build()
            .expect("authorize URL");
    let browse = Request::get(request.url())
        .body(Full::default())
        .expect("request");
    let response = h1_client().request(browse).await.expect("authorize");
    assert_eq!(response.status(), http::StatusCode::FOUND);
    let location = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let (_, query) = location.split_once('?').expect("a query");
    let code = request
        .into_state()
        .verify_callback(query)
        .expect("callback");
    user_grant(fake)
        .exchange(&code, LOGIN_REDIRECT)
        .await
        .expect("code exchange")
}

/// The name `GET /api/v2/users/me` answered to `request`, or the error (a status other than
/// 200 included, with the body).
pub async fn users_me<S>(client: S, request: Request<Full<Bytes>>) -> Result<String, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<hyper::body::Incoming>, Error = BoxError>,
{
    let response = client.oneshot(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != 200 {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)).into());
    }
    let me: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(me["name"].as_str().unwrap_or_default().to_owned())
}

/// [`users_me`] for the user under `key` (a `UserKey` extension), on the API at `api`.
pub async fn user_name<S>(api: &http::Uri, client: S, key: &str) -> Result<String, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<hyper::body::Incoming>, Error = BoxError>,
{
    let mut request = Request::get(format!("{}/api/v2/users/me", base(api)))
        .body(Full::default())
        .expect("request");
    request
        .extensions_mut()
        .insert(genesys_auth_layer::UserKey::new(key));
    users_me(client, request).await
}
