//! Where the product's HTTP clients may connect, and whom they trust.
//!
//! Servers hand the product URLs it then fetches: manifest file URLs, `Content-Location`
//! status and job URLs, redirects, discovered token endpoints. A hostile or compromised server
//! could point those at the cloud metadata service (169.254.169.254, fd00:ec2::254) or at
//! hosts inside the network, and whatever comes back would be staged to S3. So every
//! connection passes an [`AddressPolicy`]:
//!
//! - public addresses are always allowed;
//! - loopback, private (RFC 1918, CGNAT, unique local) and link-local/metadata/unspecified
//!   addresses only when a configured endpoint (source or target) is itself on an address of
//!   that class — a test on 127.0.0.1, a hospital network on 10.x;
//! - the configured endpoints' own host names are always allowed (that is the operator's
//!   choice, not a server's).
//!
//! Host names are checked where they are resolved ([`PolicyResolver`], reqwest's DNS hook),
//! so a name that resolves to a forbidden address is caught too; IP literals never reach a
//! resolver and are checked before each request and on every redirect
//! ([`AddressPolicy::check_url`], [`redirect_policy`]).
//!
//! Trust: the system's roots (rustls-native-certs, which honours `SSL_CERT_FILE` and
//! `SSL_CERT_DIR`), plus the Mozilla roots bundled in the binary (a scratch container has no
//! system store), plus a side's `*_CA_FILE`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Side;
use pathling_import_core::spec::TransferSpec;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::sync::OnceCell;

/// The kind of network an address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AddressClass {
    Public,
    Loopback,
    /// RFC 1918, 100.64/10 (CGNAT), fc00::/7 (unique local).
    Private,
    /// 169.254/16 and fe80::/10, including the cloud metadata services, the unspecified
    /// addresses and everything else no server-supplied URL has a reason to name.
    LinkLocal,
}

impl AddressClass {
    pub fn of(ip: IpAddr) -> AddressClass {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => class_v4(v4),
            IpAddr::V6(v6) => class_v6(v6),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            AddressClass::Public => "a public address",
            AddressClass::Loopback => "a loopback address",
            AddressClass::Private => "a private network address",
            AddressClass::LinkLocal => "a link-local, metadata-service or unspecified address",
        }
    }
}

fn class_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_unspecified() || ip.is_link_local() || ip.is_broadcast() || a == 0 {
        AddressClass::LinkLocal
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

/// AWS's instance metadata service over IPv6.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

fn class_v6(ip: Ipv6Addr) -> AddressClass {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_unspecified() || ip == AWS_METADATA_V6 || (first & 0xffc0) == 0xfe80 {
        AddressClass::LinkLocal
    } else if (first & 0xfe00) == 0xfc00 {
        AddressClass::Private
    } else {
        AddressClass::Public
    }
}

/// The address classes server-supplied URLs may reach, learnt from the configured endpoints.
#[derive(Debug)]
pub struct AddressPolicy {
    /// Lower-case host names of the configured endpoints (always allowed).
    configured_hosts: BTreeSet<String>,
    /// Classes of the configured endpoints' addresses, resolved once on first use.
    allowed: OnceCell<BTreeSet<AddressClass>>,
}

/// Why a connection was refused; found by downcasting a request error's source chain.
#[derive(Debug, thiserror::Error)]
#[error("{host} is {class_text} ({address}); pathling-import does not connect to such addresses for server-supplied URLs unless a configured endpoint is on one")]
pub struct AddressRefused {
    pub host: String,
    pub address: IpAddr,
    class_text: &'static str,
}

/// A host name that could not be resolved (kept apart so failures can say "DNS").
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {host}: {source}")]
pub struct DnsFailure {
    pub host: String,
    #[source]
    source: std::io::Error,
}

impl AddressPolicy {
    /// The policy for a run whose configured endpoints are `endpoints` (base URLs).
    pub fn new<'a>(endpoints: impl IntoIterator<Item = &'a str>) -> Arc<AddressPolicy> {
        let configured_hosts = endpoints
            .into_iter()
            .filter_map(|e| url::Url::parse(e).ok())
            .filter_map(|u| u.host_str().map(|h| trim_brackets(h).to_ascii_lowercase()))
            .collect();
        Arc::new(AddressPolicy {
            configured_hosts,
            allowed: OnceCell::new(),
        })
    }

    fn is_configured(&self, host: &str) -> bool {
        self.configured_hosts
            .contains(&trim_brackets(host).to_ascii_lowercase())
    }

    async fn allowed(&self) -> &BTreeSet<AddressClass> {
        self.allowed
            .get_or_init(|| async {
                let mut classes = BTreeSet::from([AddressClass::Public]);
                for host in &self.configured_hosts {
                    if let Ok(ip) = host.parse::<IpAddr>() {
                        classes.insert(AddressClass::of(ip));
                        continue;
                    }
                    // A configured name that does not resolve now simply teaches nothing;
                    // requests to it fail on their own with the DNS error.
                    if let Ok(addrs) = tokio::net::lookup_host((host.as_str(), 0)).await {
                        classes.extend(addrs.map(|a| AddressClass::of(a.ip())));
                    }
                }
                classes
            })
            .await
    }

    fn allowed_now(&self) -> BTreeSet<AddressClass> {
        match self.allowed.get() {
            Some(classes) => classes.clone(),
            // Not resolved yet: what the configured IP literals alone allow.
            None => std::iter::once(AddressClass::Public)
                .chain(
                    self.configured_hosts
                        .iter()
                        .filter_map(|h| h.parse::<IpAddr>().ok())
                        .map(AddressClass::of),
                )
                .chain(
                    self.configured_hosts
                        .iter()
                        .filter(|h| h.as_str() == "localhost")
                        .map(|_| AddressClass::Loopback),
                )
                .collect(),
        }
    }

    /// Checks a URL whose host is an IP literal (names are checked when resolved). Returns
    /// a message naming the host, never the path or query (pre-signed URLs carry secrets).
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let Ok(parsed) = url::Url::parse(url) else {
            return Ok(());
        };
        let Some(host) = parsed.host() else {
            return Ok(());
        };
        let ip = match host {
            url::Host::Ipv4(v4) => IpAddr::V4(v4),
            url::Host::Ipv6(v6) => IpAddr::V6(v6),
            url::Host::Domain(_) => return Ok(()),
        };
        let shown = parsed.host_str().unwrap_or_default().to_string();
        if self.is_configured(&shown) {
            return Ok(());
        }
        let class = AddressClass::of(ip);
        if self.allowed_now().contains(&class) {
            Ok(())
        } else {
            Err(AddressRefused {
                host: shown,
                address: ip,
                class_text: class.describe(),
            }
            .to_string())
        }
    }

    async fn filter(
        &self,
        host: &str,
        addrs: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, AddressRefused> {
        if self.is_configured(host) {
            return Ok(addrs);
        }
        let allowed = self.allowed().await;
        let (keep, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs
            .into_iter()
            .partition(|a| allowed.contains(&AddressClass::of(a.ip())));
        match (keep.is_empty(), refused.first()) {
            (true, Some(first)) => Err(AddressRefused {
                host: host.to_string(),
                address: first.ip(),
                class_text: AddressClass::of(first.ip()).describe(),
            }),
            _ => Ok(keep),
        }
    }
}

fn trim_brackets(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// reqwest's DNS hook: the system resolver, filtered by the [`AddressPolicy`].
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|source| DnsFailure {
                    host: host.clone(),
                    source,
                })?
                .collect();
            let kept = policy.filter(&host, addrs).await?;
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// Follows up to 10 redirects, none to an address the policy forbids. (reqwest itself drops
/// `Authorization` whenever a redirect leaves the original host or port.)
pub fn redirect_policy(policy: Arc<AddressPolicy>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("too many redirects (more than 10)");
        }
        match policy.check_url(attempt.url().as_str()) {
            Ok(()) => attempt.follow(),
            Err(why) => attempt.error(format!("redirect refused: {why}")),
        }
    })
}

/// Builds every HTTP client of one executor: the same timeouts, trust and address policy,
/// with or without redirects.
#[derive(Clone)]
pub struct Clients {
    transfer: TransferSpec,
    policy: Arc<AddressPolicy>,
    source_roots: Vec<reqwest::Certificate>,
    target_roots: Vec<reqwest::Certificate>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("policy", &self.policy)
            .field("source_roots", &self.source_roots.len())
            .field("target_roots", &self.target_roots.len())
            .finish()
    }
}

/// A `*_CA_FILE` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct CaFileError {
    pub key: String,
    pub message: String,
}

impl Clients {
    /// Reads the CA files (PEM bundles) once.
    pub fn new(
        transfer: &TransferSpec,
        policy: Arc<AddressPolicy>,
        tls: &pathling_import_core::config::TlsConfig,
    ) -> Result<Clients, CaFileError> {
        Ok(Clients {
            transfer: transfer.clone(),
            policy,
            source_roots: read_roots("SOURCE_CA_FILE", tls.source_ca_file.as_deref())?,
            target_roots: read_roots("TARGET_CA_FILE", tls.target_ca_file.as_deref())?,
        })
    }

    pub fn policy(&self) -> &Arc<AddressPolicy> {
        &self.policy
    }

    /// A builder with the side's trust, the address policy and the timeouts, following
    /// (policy-checked) redirects. The authenticator turns redirects off on its own.
    pub fn builder(&self, side: Side) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder()
            .user_agent(crate::http::USER_AGENT)
            .connect_timeout(Duration::from_millis(self.transfer.connect_timeout_ms))
            .read_timeout(Duration::from_millis(self.transfer.read_timeout_ms))
            .gzip(true)
            .tls_built_in_root_certs(true)
            .dns_resolver(Arc::new(PolicyResolver {
                policy: self.policy.clone(),
            }))
            .redirect(redirect_policy(self.policy.clone()));
        let roots = match side {
            Side::Source => &self.source_roots,
            Side::Target => &self.target_roots,
        };
        for cert in roots {
            builder = builder.add_root_certificate(cert.clone());
        }
        builder
    }

    pub fn build(&self, side: Side) -> Result<reqwest::Client, reqwest::Error> {
        self.builder(side).build()
    }
}

fn read_roots(key: &str, path: Option<&str>) -> Result<Vec<reqwest::Certificate>, CaFileError> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let bad = |message: String| CaFileError {
        key: key.to_string(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read {path}: {e}")))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| bad(format!("{path} is not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(bad(format!("{path} holds no PEM certificate")));
    }
    Ok(certs)
}

/// Whether a URL's host is a loopback name or address (for the plain-http warning and the
/// token-endpoint rule).
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(v4)) => v4.is_loopback(),
        Some(url::Host::Ipv6(v6)) => v6.is_loopback(),
        None => false,
    }
}

/// Whether credentials for `endpoint` would travel unencrypted to another machine: plain http
/// (however the scheme is capitalised) to a host that is not loopback. The executor warns
/// about it when it is set up.
pub fn credentials_in_clear(endpoint: &str, auth_enabled: bool) -> bool {
    auth_enabled
        && url::Url::parse(endpoint).is_ok_and(|u| u.scheme() == "http")
        && !is_loopback_url(endpoint)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn class(ip: &str) -> AddressClass {
        AddressClass::of(ip.parse().unwrap())
    }

    #[test]
    fn addresses_are_classified() {
        assert_eq!(class("93.184.216.34"), AddressClass::Public);
        assert_eq!(class("127.0.0.1"), AddressClass::Loopback);
        assert_eq!(class("::1"), AddressClass::Loopback);
        assert_eq!(class("10.1.2.3"), AddressClass::Private);
        assert_eq!(class("172.16.0.1"), AddressClass::Private);
        assert_eq!(class("192.168.1.1"), AddressClass::Private);
        assert_eq!(class("100.64.0.1"), AddressClass::Private);
        assert_eq!(class("fd12::1"), AddressClass::Private);
        assert_eq!(class("169.254.169.254"), AddressClass::LinkLocal);
        assert_eq!(class("fd00:ec2::254"), AddressClass::LinkLocal);
        assert_eq!(class("fe80::1"), AddressClass::LinkLocal);
        assert_eq!(class("0.0.0.0"), AddressClass::LinkLocal);
        assert_eq!(class("::"), AddressClass::LinkLocal);
        assert_eq!(class("::ffff:169.254.169.254"), AddressClass::LinkLocal);
        assert_eq!(class("::ffff:10.0.0.1"), AddressClass::Private);
    }

    #[test]
    fn ip_literals_are_checked_against_the_configured_classes() {
        let loopback = AddressPolicy::new(["http://127.0.0.1:8080/fhir"]);
        assert!(loopback.check_url("http://127.0.0.1:9999/x").is_ok());
        assert!(loopback.check_url("https://93.184.216.34/x").is_ok());
        let refused = loopback
            .check_url("http://169.254.169.254/latest/meta-data/?X-Amz-Signature=secret")
            .unwrap_err();
        assert!(refused.contains("169.254.169.254"), "{refused}");
        assert!(!refused.contains("secret") && !refused.contains("meta-data"));
        assert!(loopback.check_url("http://[fd00:ec2::254]/").is_err());
        assert!(loopback.check_url("http://10.0.0.5/").is_err());

        let public = AddressPolicy::new(["https://93.184.216.34/fhir"]);
        assert!(public.check_url("http://127.0.0.1:1/").is_err());
        assert!(public.check_url("http://192.168.0.10/").is_err());

        let metadata = AddressPolicy::new(["http://169.254.169.254/"]);
        assert!(metadata.check_url("http://169.254.169.254/x").is_ok());
    }

    #[tokio::test]
    async fn resolved_names_are_filtered() {
        // An IP literal as the configured endpoint: the test resolves no name.
        let policy = AddressPolicy::new(["https://93.184.216.34/fhir"]);
        let addrs = vec![
            SocketAddr::from(([169, 254, 169, 254], 80)),
            SocketAddr::from(([127, 0, 0, 1], 80)),
        ];
        let err = policy
            .filter("evil.example", addrs.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("evil.example"), "{err}");
        // The configured host itself is the operator's choice.
        assert_eq!(
            policy.filter("93.184.216.34", addrs).await.unwrap().len(),
            2
        );
    }

    #[test]
    fn loopback_urls_are_recognised() {
        assert!(is_loopback_url("http://localhost:8080/x"));
        assert!(is_loopback_url("http://127.0.0.1/x"));
        assert!(is_loopback_url("http://[::1]:1/"));
        assert!(!is_loopback_url("http://fhir.example.org/"));
    }

    #[test]
    fn credentials_in_clear_only_over_plain_http_to_another_machine() {
        for endpoint in [
            "http://fhir.example.org/fhir",
            "HTTP://fhir.example.org/fhir",
            "http://10.1.2.3:8080/fhir",
            "http://[fd12::1]/fhir",
        ] {
            assert!(credentials_in_clear(endpoint, true), "{endpoint}");
            assert!(
                !credentials_in_clear(endpoint, false),
                "{endpoint}: no credentials"
            );
        }
        for endpoint in [
            "https://fhir.example.org/fhir",
            "HTTPS://fhir.example.org/fhir",
            "http://localhost:8080/fhir",
            "http://127.0.0.1:8080/fhir",
            "http://[::1]/fhir",
        ] {
            assert!(!credentials_in_clear(endpoint, true), "{endpoint}");
        }
    }
}
