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
}

#[derive(Clone, PartialEq, Eq)]
struct Origin {
    https: bool,
    host: String,
    port: u16,
}

impl Origin {
    fn of(uri: &Uri) -> Option<Self> {
        let https = match uri.scheme_str()? {
            s if s.eq_ignore_ascii_case("https") => true,
            s if s.eq_ignore_ascii_case("http") => false,
            _ => return None,
        };
        let host = uri.host()?.to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Some(Self { https, host, port })
    }

    fn matches(&self, uri: &Uri) -> bool {
        let https = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            _ => return false,
        };
        https == self.https
            && uri.port_u16().unwrap_or(if https { 443 } else { 80 }) == self.port
            && uri
                .host()
                .is_some_and(|h| h.eq_ignore_ascii_case(&self.host))
    }
}

impl Scope {
    /// A scope of the given origins; only the scheme, host and port of each URI count.
    pub fn new<I>(origins: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = Uri>,
    {
        let origins = origins
            .into_iter()
            .map(|uri| Origin::of(&uri).ok_or_else(|| ConfigError::InvalidUri(uri.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { origins })
    }

    /// Adds an origin.
    pub fn with_origin(mut self, uri: Uri) -> Result<Self, ConfigError> {
        let origin = Origin::of(&uri).ok_or_else(|| ConfigError::InvalidUri(uri.to_string()))?;
        if !self.origins.contains(&origin) {
            self.origins.push(origin);
        }
        Ok(self)
    }

    /// Whether the URI's origin is in scope.
    pub fn contains(&self, uri: &Uri) -> bool {
        self.origins.iter().any(|o| o.matches(uri))
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
            .entries(self.origins.iter().map(|o| {
                format!(
                    "{}://{}:{}",
                    if o.https { "https" } else { "http" },
                    o.host,
                    o.port
                )
            }))
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
