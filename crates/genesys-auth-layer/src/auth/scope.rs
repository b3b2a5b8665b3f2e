//! Which requests get a token.

use std::fmt;

use http::header::AUTHORIZATION;
use http::{Request, Uri};

use crate::error::ConfigError;

/// The origins (scheme, host, port) a token is attached to. Requests to any other origin,
/// requests with a relative URI, and requests that already carry an `Authorization` header
/// pass through untouched, so a client shared with other services never leaks the token.
///
/// ```
/// use genesys_auth_layer::{Region, Scope};
///
/// let scope = Scope::new([Region::UsEast1.api_uri()])?;
/// let to_api = http::Request::get("https://API.mypurecloud.com:443/api/v2/users").body(()).unwrap();
/// let elsewhere = http::Request::get("https://example.com/").body(()).unwrap();
/// assert!(scope.applies_to(&to_api));
/// assert!(!scope.applies_to(&elsewhere));
/// # Ok::<(), genesys_auth_layer::ConfigError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Scope {
    origins: Vec<Origin>,
    /// Every (scheme, authority spelling) pair of every origin, flat, so the per-request
    /// check walks one short slice.
    spellings: Vec<(bool, Box<[u8]>)>,
    /// A copy of the first spelling (the first origin's bare host, or `host:port` on a
    /// port other than the scheme's default), held inline: the one nearly every request
    /// matches, one load closer. Empty, so never matched, in an empty scope.
    first: (bool, Box<[u8]>),
}

#[derive(Clone, PartialEq, Eq)]
struct Origin {
    https: bool,
    /// Every spelling of the authority that names this origin: `host:port`, and `host`
    /// alone when the port is the scheme's default. Compared with the request URI's
    /// authority as it is, so the hot path parses nothing.
    authorities: Vec<String>,
}

impl Origin {
    fn of(uri: &Uri, allow_plain_http: bool) -> Result<Self, ConfigError> {
        let invalid = || ConfigError::InvalidUri(crate::error::shown_uri(&uri.to_string()));
        let https = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            _ => return Err(invalid()),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(invalid)?;
        if !https && !allow_plain_http && !crate::source::is_loopback(uri) {
            return Err(ConfigError::InsecureOrigin(crate::error::shown_uri(
                &uri.to_string(),
            )));
        }
        let host = host.to_ascii_lowercase();
        let default_port = if https { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        // The bare host first: it is how nearly every request spells a default port.
        let mut authorities = Vec::with_capacity(2);
        if port == default_port {
            authorities.push(host.clone());
        }
        authorities.push(format!("{host}:{port}"));
        Ok(Self { https, authorities })
    }

    fn describe(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let with_port = self.authorities.last().map_or("", String::as_str);
        format!("{scheme}://{with_port}")
    }
}

/// Byte equality in a few word comparisons (the last word may overlap the ones before it):
/// for the short strings compared here, cheaper than the `memcmp` call that `==` on slices
/// becomes.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |chunk: &[u8; 8]| u64::from_ne_bytes(*chunk);
    match (a.split_first_chunk::<8>(), b.split_first_chunk::<8>()) {
        (Some((a_first, a_rest)), Some((b_first, b_rest))) => {
            // The first and the last word, then the whole words after the first (none under
            // 16 bytes; at 16, the last word again).
            word(a_first) == word(b_first)
                && a.last_chunk::<8>().map(word) == b.last_chunk::<8>().map(word)
                && a_rest
                    .chunks_exact(8)
                    .zip(b_rest.chunks_exact(8))
                    .all(|(x, y)| x.first_chunk::<8>().map(word) == y.first_chunk::<8>().map(word))
        }
        _ => a.iter().zip(b).all(|(x, y)| x == y),
    }
}

impl Scope {
    /// A scope of the given origins; only the scheme, host and port of each URI count.
    ///
    /// Plain `http` origins are refused unless they are loopback, since the token would
    /// cross the network in clear; see [`Scope::with_insecure_origin`] for the exception.
    ///
    /// ```
    /// use genesys_auth_layer::{ConfigError, Region, Scope};
    /// use http::Uri;
    ///
    /// let apps = Uri::from_static("https://apps.example.com");
    /// let scope = Scope::new([Region::EuWest1.api_uri(), apps])?;
    /// assert!(scope.contains(&Uri::from_static("https://apps.example.com/directory")));
    /// // Plain http only on loopback:
    /// assert!(Scope::new([Uri::from_static("http://127.0.0.1:8080")]).is_ok());
    /// let err = Scope::new([Uri::from_static("http://api.example.com")]).unwrap_err();
    /// assert!(matches!(err, ConfigError::InsecureOrigin(_)));
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn new<I>(origins: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = Uri>,
    {
        origins.into_iter().try_fold(
            Self {
                origins: Vec::new(),
                spellings: Vec::new(),
                first: (false, Box::default()),
            },
            Self::with_origin,
        )
    }

    /// Adds an origin (https, or http on loopback).
    ///
    /// ```
    /// use genesys_auth_layer::{Region, Scope};
    /// use http::Uri;
    ///
    /// let scope = Scope::new([Region::UsEast1.api_uri()])?
    ///     .with_origin(Uri::from_static("https://gateway.example.com:8443"))?;
    /// assert!(scope.contains(&Uri::from_static("https://gateway.example.com:8443/api/v2/users")));
    /// // The port is part of the origin.
    /// assert!(!scope.contains(&Uri::from_static("https://gateway.example.com/api/v2/users")));
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    pub fn with_origin(self, uri: Uri) -> Result<Self, ConfigError> {
        self.push(Origin::of(&uri, false)?)
    }

    /// Adds a plain-`http` origin on another host: the token will cross the network in
    /// clear, so only for a trusted link (a sidecar, a private gateway).
    ///
    /// ```
    /// use genesys_auth_layer::{ConfigError, Region, Scope};
    /// use http::Uri;
    ///
    /// let proxy = Uri::from_static("http://auth-proxy.internal:8080");
    /// let scope = Scope::new([Region::UsEast1.api_uri()])?.with_insecure_origin(proxy.clone())?;
    /// assert!(scope.contains(&Uri::from_static("http://auth-proxy.internal:8080/api/v2/users")));
    /// // `with_origin` refuses it:
    /// let refused = Scope::new([Region::UsEast1.api_uri()])?.with_origin(proxy);
    /// assert!(matches!(refused, Err(ConfigError::InsecureOrigin(_))));
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn with_insecure_origin(self, uri: Uri) -> Result<Self, ConfigError> {
        self.push(Origin::of(&uri, true)?)
    }

    fn push(mut self, origin: Origin) -> Result<Self, ConfigError> {
        if !self.origins.contains(&origin) {
            let https = origin.https;
            self.spellings.extend(
                origin
                    .authorities
                    .iter()
                    .map(|a| (https, a.as_bytes().into())),
            );
            self.origins.push(origin);
            if let Some(first) = self.spellings.first() {
                self.first = first.clone();
            }
        }
        Ok(self)
    }

    /// Whether the URI's origin is in scope. A URI with user info (`user@host`) never is.
    ///
    /// ```
    /// use genesys_auth_layer::{Region, Scope};
    /// use http::Uri;
    ///
    /// let scope = Scope::new([Region::UsEast1.api_uri()])?;
    /// assert!(scope.contains(&Uri::from_static("https://api.mypurecloud.com/api/v2/users")));
    /// assert!(!scope.contains(&Uri::from_static("http://api.mypurecloud.com/"))); // plain http
    /// assert!(!scope.contains(&Uri::from_static("/api/v2/users"))); // relative
    /// assert!(!scope.contains(&Uri::from_static("https://user@api.mypurecloud.com/")));
    /// # Ok::<(), genesys_auth_layer::ConfigError>(())
    /// ```
    #[inline]
    pub fn contains(&self, uri: &Uri) -> bool {
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return false;
        };
        let authority = authority.as_str().as_bytes();
        // Parsing a URI string turns `http` and `https` in any case into the standard
        // schemes, which print in lower case; the exact spelling is what nearly every
        // request uses. Anything else is compared in any case, out of line.
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return self.contains_in_any_case(scheme, authority),
        };
        // The first spelling (the first origin's bare host) inline: it is what nearly every
        // request to a one-origin scope uses. The others, and other cases, out of line.
        let (h, a) = &self.first;
        (*h == https && same_bytes(a, authority))
            || self.contains_elsewhere(https, scheme, authority)
    }

    #[cold]
    #[inline(never)]
    fn contains_elsewhere(&self, https: bool, scheme: &str, authority: &[u8]) -> bool {
        self.spellings
            .iter()
            .skip(1)
            .any(|(h, a)| *h == https && same_bytes(a, authority))
            || self.contains_in_any_case(scheme, authority)
    }

    #[cold]
    #[inline(never)]
    fn contains_in_any_case(&self, scheme: &str, authority: &[u8]) -> bool {
        let https = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            return false;
        };
        self.spellings
            .iter()
            .any(|(h, a)| *h == https && a.eq_ignore_ascii_case(authority))
    }

    /// Whether this layer should authorize `request`: its origin is in scope and it has no
    /// `Authorization` header of its own.
    ///
    /// ```
    /// use genesys_auth_layer::{Region, Scope};
    /// use http::{header::AUTHORIZATION, Request};
    ///
    /// let scope = Scope::new([Region::UsEast1.api_uri()])?;
    /// let plain = Request::get("https://api.mypurecloud.com/api/v2/users/me").body(())?;
    /// assert!(scope.applies_to(&plain));
    /// // A request with a token of its own keeps it.
    /// let own = Request::get("https://api.mypurecloud.com/api/v2/users/me")
    ///     .header(AUTHORIZATION, "Bearer another-token")
    ///     .body(())?;
    /// assert!(!scope.applies_to(&own));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn applies_to<B>(&self, request: &Request<B>) -> bool {
        !request.headers().contains_key(AUTHORIZATION) && self.contains(request.uri())
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.origins.iter().map(Origin::describe))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn origin_matching_is_exact_on_scheme_host_and_port() {
        let scope = Scope::new([Uri::from_static("https://api.mypurecloud.ie")]).unwrap();
        assert!(scope.applies_to(&get("https://api.mypurecloud.ie/api/v2/x")));
        assert!(scope.applies_to(&get("https://api.mypurecloud.ie:443/")));
        assert!(!scope.applies_to(&get("http://api.mypurecloud.ie/")));
        assert!(!scope.applies_to(&get("https://api.mypurecloud.ie:8443/")));
        assert!(!scope.applies_to(&get("https://api.mypurecloud.ie.evil.com/")));
        assert!(!scope.applies_to(&get("https://login.mypurecloud.ie/")));
        assert!(!scope.applies_to(&get("/api/v2/relative")));
        assert!(!scope.applies_to(&get("https://user@api.mypurecloud.ie/")));
        assert!(scope.applies_to(&get("HTTPS://API.MyPureCloud.ie/")));
        let by_hand = Uri::builder()
            .scheme("HTTPS")
            .authority("api.mypurecloud.ie")
            .path_and_query("/api/v2/x")
            .build()
            .unwrap();
        assert!(scope.contains(&by_hand));
    }

    #[test]
    fn byte_comparison_agrees_with_slice_equality() {
        let words: Vec<Vec<u8>> = (0..40u8)
            .map(|n| (0..n).map(|i| b'a' + i % 26).collect())
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(same_bytes(a, b), a == b);
            }
            // Any single differing byte is seen, wherever it is.
            for i in 0..a.len() {
                let mut c = a.clone();
                c[i] ^= 0x20;
                assert!(!same_bytes(a, &c), "{a:?} vs {c:?}");
            }
        }
    }

    #[test]
    fn plain_http_origins_only_on_loopback_unless_explicit() {
        assert!(matches!(
            Scope::new([Uri::from_static("http://api.example.com")]),
            Err(ConfigError::InsecureOrigin(_))
        ));
        assert!(Scope::new([Uri::from_static("http://[::1]:8080")]).is_ok());
        let scope = Scope::new([])
            .unwrap()
            .with_insecure_origin(Uri::from_static("http://sidecar:8080"))
            .unwrap();
        assert!(scope.contains(&Uri::from_static("http://sidecar:8080/api")));
    }

    #[test]
    fn own_authorization_is_left_alone() {
        let scope = Scope::new([Uri::from_static("http://127.0.0.1:8080")]).unwrap();
        let mut req = get("http://127.0.0.1:8080/api");
        assert!(scope.applies_to(&req));
        req.headers_mut()
            .insert(AUTHORIZATION, "Bearer mine".parse().unwrap());
        assert!(!scope.applies_to(&req));
    }

    #[test]
    fn extra_origins_and_bad_ones() {
        let scope = Scope::new([Uri::from_static("https://a.example")])
            .unwrap()
            .with_origin(Uri::from_static("https://b.example"))
            .unwrap();
        assert!(scope.contains(&Uri::from_static("https://b.example/x")));
        assert!(Scope::new([Uri::from_static("/relative")]).is_err());
        assert_eq!(
            format!("{scope:?}"),
            r#"["https://a.example:443", "https://b.example:443"]"#
        );
    }
}
