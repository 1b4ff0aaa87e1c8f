//! Log-in: the client's password is a catalog JWT (what BI tools call the
//! password field), the user name is free (the token's subject is audited), and the
//! database names the layer bare names resolve in. A refusal is audited.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::Sink;
use futures::SinkExt;
use medallion_spec::model::Layer;
use pgwire::api::auth::{
    DefaultServerParameterProvider, LoginInfo, StartupHandler, finish_authentication,
    protocol_negotiation, save_startup_parameters_to_metadata,
};
use pgwire::api::{ClientInfo, PgWireConnectionState};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

use super::Connection;
use crate::sql_gate::{Protocol, authenticate};

pub(crate) struct JwtStartup {
    conn: Arc<Connection>,
    parameters: DefaultServerParameterProvider,
}

impl JwtStartup {
    pub(crate) fn new(conn: Arc<Connection>) -> Self {
        let mut parameters = DefaultServerParameterProvider::default();
        // Clients read this to pick their dialect; say what they talk to.
        parameters.server_version = format!("16.6 (Medallion {})", env!("CARGO_PKG_VERSION"));
        parameters.default_transaction_read_only = true;
        JwtStartup { conn, parameters }
    }
}

fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message,
    )))
}

/// The layer a database name stands for.
fn layer_of(database: Option<&str>) -> Result<Layer, String> {
    match database {
        Some("gold") => Ok(Layer::Gold),
        Some("silver") => Ok(Layer::Silver),
        Some("bronze") => Ok(Layer::Bronze),
        other => Err(format!(
            "database `{}` does not exist; connect to gold, silver or bronze (the layer `schema.table` reads; `layer.domain.table` works in any)",
            other.unwrap_or("")
        )),
    }
}

#[async_trait]
impl StartupHandler for JwtStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                let login = LoginInfo::from_client_info(client);
                let database = layer_of(login.database()).map_err(|m| fatal("3D000", m))?;
                let _ = self.conn.database.set(database);
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                // The user name is not checked: BI tools insist on one, and
                // the token's subject is who the caller is (and is audited).
                let caller = authenticate(
                    &self.conn.state,
                    pwd.password.trim(),
                    None,
                    Protocol::Postgres,
                )
                .await
                .map_err(|e| {
                    fatal(
                        "28P01",
                        format!(
                            "password authentication failed: the password must be a catalog token (JWT): {e}"
                        ),
                    )
                })?;
                let _ = self.conn.caller.set(caller);
                finish_authentication(client, &self.parameters).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_a_layer() {
        assert_eq!(layer_of(Some("gold")), Ok(Layer::Gold));
        assert_eq!(layer_of(Some("bronze")), Ok(Layer::Bronze));
        let e = layer_of(Some("postgres")).unwrap_err();
        assert!(e.contains("gold, silver or bronze"), "{e}");
    }
}
