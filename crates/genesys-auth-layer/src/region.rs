//! Genesys Cloud regions and the endpoints they imply.
//!
//! This module owns the table of regions (name, domain) and the derivation of the login
//! host (`https://login.<domain>`) and the API host (`https://api.<domain>`) from it.

use std::fmt;
use std::str::FromStr;

use http::Uri;

use crate::error::ConfigError;

macro_rules! regions {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, $domain:literal; )*) => {
        /// A Genesys Cloud region.
        ///
        /// Parse one from its AWS-style name or its domain, in any case:
        ///
        /// ```
        /// use genesys_auth_layer::Region;
        ///
        /// let by_name: Region = "eu-west-1".parse()?;
        /// let by_domain: Region = "mypurecloud.ie".parse()?;
        /// assert_eq!(by_name, by_domain);
        /// assert_eq!(by_name.api_uri(), "https://api.mypurecloud.ie");
        /// assert_eq!(by_name.token_url(), "https://login.mypurecloud.ie/oauth/token");
        ///
        /// let err = "mars-north-1".parse::<Region>().unwrap_err();
        /// assert!(err.to_string().contains("us-east-1"));
        /// # Ok::<(), genesys_auth_layer::UnknownRegion>(())
        /// ```
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Region {
            $( $(#[$doc])* $variant, )*
        }

        impl Region {
            /// Every region this crate knows, in the order Genesys lists them.
            pub const ALL: &'static [Region] = &[ $( Region::$variant, )* ];

            /// The region's AWS-style name, e.g. `us-east-1`; its `Display` prints the same.
            pub const fn name(self) -> &'static str {
                match self { $( Region::$variant => $name, )* }
            }

            /// The region's domain, e.g. `mypurecloud.com`.
            pub const fn domain(self) -> &'static str {
                match self { $( Region::$variant => $domain, )* }
            }
        }
    };
}

regions! {
    /// Americas (US East), `mypurecloud.com`.
    UsEast1 => "us-east-1", "mypurecloud.com";
    /// EMEA (Dublin), `mypurecloud.ie`.
    EuWest1 => "eu-west-1", "mypurecloud.ie";
    /// Asia Pacific (Sydney), `mypurecloud.com.au`.
    ApSoutheast2 => "ap-southeast-2", "mypurecloud.com.au";
    /// Asia Pacific (Tokyo), `mypurecloud.jp`.
    ApNortheast1 => "ap-northeast-1", "mypurecloud.jp";
    /// EMEA (Frankfurt), `mypurecloud.de`.
    EuCentral1 => "eu-central-1", "mypurecloud.de";
    /// Americas (US West), `usw2.pure.cloud`.
    UsWest2 => "us-west-2", "usw2.pure.cloud";
    /// Americas (Canada), `cac1.pure.cloud`.
    CaCentral1 => "ca-central-1", "cac1.pure.cloud";
    /// Asia Pacific (Seoul), `apne2.pure.cloud`.
    ApNortheast2 => "ap-northeast-2", "apne2.pure.cloud";
    /// EMEA (London), `euw2.pure.cloud`.
    EuWest2 => "eu-west-2", "euw2.pure.cloud";
    /// Asia Pacific (Mumbai), `aps1.pure.cloud`.
    ApSouth1 => "ap-south-1", "aps1.pure.cloud";
    /// Americas (US East, FedRAMP), `use2.us-gov-pure.cloud`.
    UsEast2 => "us-east-2", "use2.us-gov-pure.cloud";
    /// Americas (São Paulo), `sae1.pure.cloud`.
    SaEast1 => "sa-east-1", "sae1.pure.cloud";
    /// Middle East (UAE), `mec1.pure.cloud`.
    MeCentral1 => "me-central-1", "mec1.pure.cloud";
    /// Asia Pacific (Osaka), `apne3.pure.cloud`.
    ApNortheast3 => "ap-northeast-3", "apne3.pure.cloud";
    /// EMEA (Zurich), `euc2.pure.cloud`.
    EuCentral2 => "eu-central-2", "euc2.pure.cloud";
    /// Americas (Mexico), `mxc1.pure.cloud`.
    MxCentral1 => "mx-central-1", "mxc1.pure.cloud";
    /// Asia Pacific (Singapore), `apse1.pure.cloud`.
    ApSoutheast1 => "ap-southeast-1", "apse1.pure.cloud";
    /// EMEA (EU sovereign cloud, Germany), `edee1.eusc-pure.cloud`.
    EuscDeEast1 => "eusc-de-east-1", "edee1.eusc-pure.cloud";
}

impl Region {
    /// The login host's base URI, `https://login.<domain>/`.
    pub fn login_uri(self) -> Uri {
        base_uri("login", self.domain())
    }

    /// The API host's base URI, `https://api.<domain>/`: the origin the token is attached to.
    pub fn api_uri(self) -> Uri {
        base_uri("api", self.domain())
    }

    /// The token endpoint, `https://login.<domain>/oauth/token`.
    pub fn token_url(self) -> Uri {
        join(&self.login_uri(), "/oauth/token")
    }
}

fn base_uri(host: &str, domain: &str) -> Uri {
    Uri::builder()
        .scheme("https")
        .authority(format!("{host}.{domain}"))
        .path_and_query("/")
        .build()
        // Every domain in the table is a valid authority; a test walks all of them.
        .unwrap_or_else(|_| Uri::from_static("https://invalid.invalid/"))
}

/// `base` with its path replaced by `path` (which starts with `/`).
pub(crate) fn join(base: &Uri, path: &str) -> Uri {
    let mut parts = base.clone().into_parts();
    let prefix = base.path().trim_end_matches('/');
    parts.path_and_query = format!("{prefix}{path}").parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| base.clone())
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Region {
    type Err = UnknownRegion;

    /// Accepts a name (`us-east-1`, also `us_east_1` as Genesys' SDKs spell it), a domain
    /// (`mypurecloud.com`), or a login/API host or URL of one (`https://api.mypurecloud.com`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        let wanted = wanted
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let wanted = wanted
            .strip_prefix("login.")
            .or_else(|| wanted.strip_prefix("api."))
            .unwrap_or(wanted)
            .replace('_', "-");
        Region::ALL
            .iter()
            .copied()
            .find(|r| r.name() == wanted || r.domain() == wanted)
            .ok_or_else(|| UnknownRegion {
                given: crate::error::truncate(s, 100),
            })
    }
}

/// A region name or domain that is not in [`Region::ALL`]. Its message lists the known ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownRegion {
    given: String,
}

impl UnknownRegion {
    /// What was given, cut to 100 bytes, with control and invisible formatting characters
    /// replaced by spaces, so that it is safe to log.
    pub fn given(&self) -> &str {
        &self.given
    }
}

impl fmt::Display for UnknownRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown Genesys Cloud region {:?}; known regions:",
            self.given
        )?;
        for (i, r) in Region::ALL.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{} ({})", r.name(), r.domain())?;
        }
        Ok(())
    }
}

impl std::error::Error for UnknownRegion {}

pub(crate) fn check_absolute(uri: Uri) -> Result<Uri, ConfigError> {
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    // User info (`user:password@host`) is refused: HTTP clients do not send it, so it could
    // only end up printed (in `Debug`, in logs) with whatever password it holds.
    let has_user_info = uri.authority().is_some_and(|a| a.as_str().contains('@'));
    if !scheme_ok || has_user_info || uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::InvalidUri(crate::error::shown_uri(
            &uri.to_string(),
        )));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_region_parses_from_name_and_domain_and_builds_uris() {
        assert_eq!(Region::ALL.len(), 18);
        for &r in Region::ALL {
            assert_eq!(r.name().parse::<Region>(), Ok(r));
            assert_eq!(r.domain().parse::<Region>(), Ok(r));
            assert_eq!(r.name().to_uppercase().parse::<Region>(), Ok(r));
            assert_eq!(r.name().replace('-', "_").parse::<Region>(), Ok(r));
            assert_eq!(
                format!("https://api.{}/", r.domain()).parse::<Region>(),
                Ok(r)
            );
            assert_eq!(r.api_uri().host(), Some(&*format!("api.{}", r.domain())));
            assert_eq!(
                r.token_url().to_string(),
                format!("https://login.{}/oauth/token", r.domain())
            );
        }
    }

    #[test]
    fn table_matches_genesys() {
        assert_eq!(Region::UsEast1.domain(), "mypurecloud.com");
        assert_eq!(Region::UsEast2.domain(), "use2.us-gov-pure.cloud");
        assert_eq!(Region::EuscDeEast1.domain(), "edee1.eusc-pure.cloud");
        assert_eq!("apne3.pure.cloud".parse(), Ok(Region::ApNortheast3));
    }

    #[test]
    fn unknown_region_lists_the_known_ones() {
        let err = "mypurecloud.moon".parse::<Region>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mypurecloud.moon"));
        for &r in Region::ALL {
            assert!(msg.contains(r.name()) && msg.contains(r.domain()), "{msg}");
        }
        assert!("".parse::<Region>().is_err());
        // What was given is kept safe to log.
        let err = "eu-west-9\nFORGED LOG LINE".parse::<Region>().unwrap_err();
        assert_eq!(err.given(), "eu-west-9 FORGED LOG LINE");
    }
}
