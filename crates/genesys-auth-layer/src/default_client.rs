//! A ready HTTPS client (feature `default-client`): hyper-util's pooled client over
//! hyper-rustls with the Mozilla root certificates, HTTP/1.1 and HTTP/2.

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The client type [`https_client`] returns.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use genesys_auth_layer::default_client::{https_client, HttpsClient};
///
/// /// An API client that keeps its HTTP client in a field.
/// struct Api {
///     http: HttpsClient<Full<Bytes>>,
/// }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let api = Api { http: https_client() };
/// # let _ = api.http; });
/// ```
pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// A pooled HTTPS client (plain `http` is allowed too, for loopback tests), usable both for
/// token requests and for the API.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let client = genesys_auth_layer::default_client::https_client::<Full<Bytes>>();
/// # let _ = client; });
/// ```
pub fn https_client<B>() -> HttpsClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let connector = HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}
