//! Which requests get a token.

use std::fmt;

use http::header::AUTHORIZATION;
use http::uri::Scheme;
use http::{Request, Uri};

use crate::error::ConfigError;

/// The origins (scheme, host, port) a token is attached to. Requests to any other origin,
/// requests with a relative URI, and requests that already carry an `Authorization` header
/// pass through untouched, so a client shared with other services never leaks the token.
/// Scheme and host compare without regard to case, and a default port matches its
/// absence (`https://API.mypurecloud.com:443/` is in the scope of
/// `https://api.mypurecloud.com`).
#[derive(Clone, PartialEq, Eq)]
pub struct Scope {
    origins: Vec<Origin>,
    /// Every (scheme, authority spelling) pair of every origin, flat, so the per-request
    /// check walks one short slice.
    spellings: Vec<(bool, Box<[u8]>)>,
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

impl Scope {
    /// A scope of no origin (no allocation), for state whose scope is checked elsewhere.
    pub(crate) fn empty() -> Self {
        Self {
            origins: Vec::new(),
            spellings: Vec::new(),
        }
    }

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
            },
            Self::with_origin,
        )
    }

    /// Adds an origin (https, or http on loopback). The port is part of the origin:
    /// `https://gateway.example.com:8443` does not cover `https://gateway.example.com`.
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
        }
        Ok(self)
    }

    /// Whether the URI's origin is in scope. A relative URI, or one with user info
    /// (`user@host`), never is; `http://` never matches an `https` origin.
    pub fn contains(&self, uri: &Uri) -> bool {
        // Parsing turns `http` and `https` in any case into the standard schemes, which
        // compare as an enum; a URI built by hand may spell them otherwise.
        let https = match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTPS => true,
            Some(scheme) if *scheme == Scheme::HTTP => false,
            Some(scheme) if scheme.as_str().eq_ignore_ascii_case("https") => true,
            Some(scheme) if scheme.as_str().eq_ignore_ascii_case("http") => false,
            _ => return false,
        };
        let Some(authority) = uri.authority() else {
            return false;
        };
        let authority = authority.as_str().as_bytes();
        // The spellings are lower case, as nearly every request writes them: an exact
        // comparison settles it, and the case-insensitive one is only its fallback.
        self.spellings
            .iter()
            .any(|(h, a)| *h == https && (**a == *authority || a.eq_ignore_ascii_case(authority)))
    }

    /// Whether this layer should authorize `request`: its origin is in scope and it has no
    /// `Authorization` header of its own.
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
