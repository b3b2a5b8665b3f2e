//! A ready HTTPS client (feature `default-client`): hyper-util's pooled client over
//! hyper-rustls with the Mozilla root certificates, HTTP/1.1 and HTTP/2.
//!
//! Its TLS uses rustls' `ring` crypto provider, named here, never the process-level default:
//! that default panics in any program whose dependencies also enable rustls' `aws-lc-rs`
//! provider (reqwest's and hyper-rustls' default features do), since rustls then cannot tell
//! which of the two to use. An application that wants another provider or TLS configuration
//! builds its own client and passes it to [`GenesysAuthBuilder::build`](crate::GenesysAuthBuilder::build).

use std::sync::Arc;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The client type [`https_client`] returns, to name it in a struct field; `B` is the
/// request body type.
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
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        // It fails only for a provider without a cipher suite or key exchange for TLS 1.2 or
        // 1.3; ring's default provider has both (tested below).
        .expect("ring's default provider supports TLS 1.2 and 1.3")
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::Full;
    use rustls::crypto::{aws_lc_rs, ring, CryptoProvider};

    /// This test binary links rustls with both of its crypto providers (a dev-dependency adds
    /// `aws-lc-rs` to our `ring`, as reqwest or hyper-rustls' default features do in an
    /// application), so rustls cannot choose a process-level default from its features: the
    /// default client must name its provider itself, not panic.
    #[test]
    fn builds_with_both_rustls_providers_linked() {
        // Both providers are compiled in (this would not compile otherwise) and nobody has
        // installed a process-level default.
        let _both = (ring::default_provider(), aws_lc_rs::default_provider());
        assert!(CryptoProvider::get_default().is_none());

        let _client = super::https_client::<Full<Bytes>>();
        let auth = crate::GenesysAuth::client_credentials("client-id", "client-secret")
            .build_with_default_client()
            .expect("a valid configuration");
        assert_eq!(auth.stats().refreshes, 0);

        // Nor did the default client install one behind the application's back.
        assert!(CryptoProvider::get_default().is_none());
    }
}
