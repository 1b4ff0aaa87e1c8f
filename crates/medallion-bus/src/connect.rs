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
            o = o.nkey(seed.trim().to_string());
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
    /// reported with the URL rather than retried silently.
    pub async fn connect(&self) -> Result<Client, BusError> {
        let options = self.options().await?;
        options
            .connect(self.url.as_str())
            .await
            .map_err(|e| BusError::Connect {
                url: self.url.clone(),
                message: format!(
                    "{e}; is nats-server running with JetStream (-js), and is NATS_URL right?"
                ),
            })
    }
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
