//! Connecting to NATS with any of the server's auth methods and TLS.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};

use crate::BusError;

/// How to reach NATS. Read from the standard `NATS_*` variables (the same names
/// the `nats` CLI uses), see `medallion_runtime::env`.
#[derive(Debug, Clone, Default)]
pub struct NatsSettings {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// File holding an NKey seed (`SU...`).
    pub nkey_file: Option<PathBuf>,
    /// A `.creds` file (JWT + NKey seed), as issued by `nsc`.
    pub creds_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Client name shown in the server's connection list.
    pub name: String,
}

impl NatsSettings {
    pub fn new(url: impl Into<String>) -> Self {
        NatsSettings {
            url: url.into(),
            name: "medallion".into(),
            ..Default::default()
        }
    }

    async fn options(&self) -> Result<ConnectOptions, BusError> {
        let mut o = ConnectOptions::new()
            .name(&self.name)
            .connection_timeout(Duration::from_secs(5))
            // After the first connection succeeds, keep reconnecting forever:
            // a NATS restart must not take the pipeline down.
            .max_reconnects(None)
            .ping_interval(Duration::from_secs(10));
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => o = o.user_and_password(u.clone(), p.clone()),
            (Some(_), None) | (None, Some(_)) => {
                return Err(BusError::Setting {
                    setting: "NATS_USER/NATS_PASSWORD",
                    message: "set both NATS_USER and NATS_PASSWORD, or neither".into(),
                });
            }
            (None, None) => {}
        }
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some(path) = &self.nkey_file {
            let seed = std::fs::read_to_string(path).map_err(|e| BusError::Setting {
                setting: "NATS_NKEY",
                message: format!("cannot read the NKey seed file {}: {e}", path.display()),
            })?;
            let seed = seed.trim().to_string();
            // async-nats only finds a bad seed once the server asks for a
            // signature; checking here names the setting instead.
            if nkeys::KeyPair::from_seed(&seed).is_err() {
                return Err(BusError::Setting {
                    setting: "NATS_NKEY",
                    message: format!(
                        "{} does not hold an NKey seed (a line starting with SU); generate one with `nsc` or `nk -gen user`",
                        path.display()
                    ),
                });
            }
            o = o.nkey(seed);
        }
        if let Some(path) = &self.creds_file {
            o = o
                .credentials_file(path)
                .await
                .map_err(|e| BusError::Setting {
                    setting: "NATS_CREDS",
                    message: format!("cannot read the credentials file {}: {e}", path.display()),
                })?;
        }
        if let Some(ca) = &self.ca_file {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                o = o
                    .add_client_certificate(c.clone(), k.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => {
                return Err(BusError::Setting {
                    setting: "NATS_CERT/NATS_KEY",
                    message: "a client certificate needs both NATS_CERT and NATS_KEY".into(),
                });
            }
        }
        if self.url.starts_with("tls://") {
            o = o.require_tls(true);
        }
        Ok(o)
    }

    /// Connects once; failing here (at start) is an error the operator must fix,
    /// reported with the URL and the setting to change rather than retried
    /// silently.
    pub async fn connect(&self) -> Result<Client, BusError> {
        let options = self.options().await?;
        // NATS_URL may list several servers (a cluster), comma-separated as
        // the nats CLI takes them; the client wants them one by one.
        let servers = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|e| BusError::Setting {
                        setting: "NATS_URL",
                        message: format!("`{u}` is not a NATS server URL ({e}); use nats://host:port, comma-separated for several"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        options
            .connect(servers)
            .await
            .map_err(|e| BusError::Connect {
                url: self.url.clone(),
                message: self.explain(&e),
            })
    }

    /// Which settings were used to authenticate, as the operator wrote them.
    fn credential_settings(&self) -> Vec<&'static str> {
        let mut used = Vec::new();
        if self.user.is_some() {
            used.push("NATS_USER/NATS_PASSWORD");
        }
        if self.token.is_some() {
            used.push("NATS_TOKEN");
        }
        if self.nkey_file.is_some() {
            used.push("NATS_NKEY");
        }
        if self.creds_file.is_some() {
            used.push("NATS_CREDS");
        }
        used
    }

    /// One line saying what failed and which setting fixes it.
    fn explain(&self, e: &async_nats::ConnectError) -> String {
        use async_nats::ConnectErrorKind as K;
        let detail = one_line(&e.to_string());
        let tls_used = self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.url.split(',').any(|u| u.trim().starts_with("tls://"));
        match e.kind() {
            K::AuthorizationViolation => match self.credential_settings().as_slice() {
                [] => format!(
                    "{detail}: the server requires authentication; set NATS_USER and NATS_PASSWORD, \
                     NATS_TOKEN, NATS_NKEY (seed file) or NATS_CREDS (.creds file)"
                ),
                used => format!(
                    "{detail}: the server refused the credentials from {}; check that value \
                     (and that the server knows this user)",
                    used.join(" and ")
                ),
            },
            K::Authentication => format!(
                "{detail}: cannot sign the server's challenge with the key from {}; \
                 is it a valid user NKey seed (SU...)?",
                self.credential_settings().join(" and ")
            ),
            K::Tls => self.explain_tls(&detail),
            // A server that demands a client certificate closes the
            // connection during the handshake: rustls reports an alert or
            // an I/O error, not always a TLS error kind.
            K::Io | K::TimedOut if tls_used && looks_like_tls(&detail) => self.explain_tls(&detail),
            _ => format!(
                "{detail}; is nats-server running with JetStream (-js), and is NATS_URL right?"
            ),
        }
    }

    fn explain_tls(&self, detail: &str) -> String {
        let lower = detail.to_ascii_lowercase();
        if lower.contains("certificaterequired")
            || lower.contains("certificate required")
            || lower.contains("bad certificate")
            || lower.contains("badcertificate")
            || lower.contains("unknownca")
            || lower.contains("unknown ca")
            || lower.contains("certificateunknown")
            || lower.contains("decrypterror")
        {
            return if self.cert_file.is_none() {
                format!(
                    "TLS handshake refused ({detail}): the server requires a client certificate; \
                     set NATS_CERT and NATS_KEY"
                )
            } else {
                format!(
                    "TLS handshake refused ({detail}): the server does not accept the client \
                     certificate in NATS_CERT/NATS_KEY; use one signed by a CA the server trusts"
                )
            };
        }
        if lower.contains("unknownissuer")
            || lower.contains("invalid peer certificate")
            || lower.contains("notvalidforname")
            || lower.contains("not valid for name")
        {
            return match &self.ca_file {
                None => format!(
                    "cannot verify the server's certificate ({detail}); set NATS_CA to the CA \
                     certificate (PEM) that signed it"
                ),
                Some(ca) => format!(
                    "cannot verify the server's certificate with NATS_CA={} ({detail}); \
                     NATS_CA must be the CA that signed the server's certificate, issued for \
                     the host in NATS_URL",
                    ca.display()
                ),
            };
        }
        format!(
            "TLS failed ({detail}); check NATS_CA, NATS_CERT/NATS_KEY and that NATS_URL \
             (tls://) points at the server's TLS port"
        )
    }
}

fn looks_like_tls(detail: &str) -> bool {
    let l = detail.to_ascii_lowercase();
    l.contains("tls") || l.contains("certificate") || l.contains("alert") || l.contains("handshake")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl NatsSettings {
    /// Reads `NATS_URL` and the optional auth/TLS settings; a referenced file
    /// that does not exist is reported as an invalid setting.
    pub fn from_env(env: &mut medallion_runtime::EnvReader, client_name: &str) -> Self {
        let url = env.string("NATS_URL");
        for u in url.split(',') {
            let u = u.trim();
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| u.starts_with(s))
                || !u.contains("://");
            if u.is_empty() || !scheme_ok {
                env.invalid(
                    "NATS_URL",
                    format!("`{u}` is not a NATS URL; write e.g. nats://127.0.0.1:4222"),
                );
            }
        }
        NatsSettings {
            url,
            user: env.optional("NATS_USER"),
            password: env.optional("NATS_PASSWORD"),
            token: env.optional("NATS_TOKEN"),
            nkey_file: env.existing_file("NATS_NKEY"),
            creds_file: env.existing_file("NATS_CREDS"),
            ca_file: env.existing_file("NATS_CA"),
            cert_file: env.existing_file("NATS_CERT"),
            key_file: env.existing_file("NATS_KEY"),
            name: client_name.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use async_nats::{ConnectError, ConnectErrorKind as K};

    use super::*;

    fn settings() -> NatsSettings {
        NatsSettings::new("nats://127.0.0.1:4222")
    }

    #[test]
    fn a_refused_credential_names_the_setting_used() {
        let e = ConnectError::new(K::AuthorizationViolation);
        let mut s = settings();
        assert!(
            s.explain(&e)
                .contains("set NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_NKEY")
        );
        s.token = Some("t".into());
        let m = s.explain(&e);
        assert!(m.contains("refused the credentials from NATS_TOKEN"), "{m}");
        assert!(!m.contains("NATS_USER"), "{m}");
    }

    #[test]
    fn tls_failures_name_the_certificate_settings() {
        let mut s = settings();
        s.url = "tls://127.0.0.1:4222".into();
        let unknown = ConnectError::with_source(
            K::Tls,
            std::io::Error::other("invalid peer certificate: UnknownIssuer"),
        );
        assert!(s.explain(&unknown).contains("set NATS_CA"));
        s.ca_file = Some("/ca.pem".into());
        assert!(s.explain(&unknown).contains("NATS_CA=/ca.pem"));
        let alert = ConnectError::with_source(
            K::Io,
            std::io::Error::other("received fatal alert: CertificateRequired"),
        );
        assert!(s.explain(&alert).contains("set NATS_CERT and NATS_KEY"));
        s.cert_file = Some("/c.pem".into());
        assert!(
            s.explain(&alert)
                .contains("does not accept the client certificate")
        );
    }
}
