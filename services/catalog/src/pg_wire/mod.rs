//! The Postgres wire protocol, for BI tools, psql and drivers: the password
//! is a catalog JWT, the database is a layer (`gold`, `silver`, `bronze`:
//! where `schema.table` resolves), and every statement goes through the
//! same gate as the HTTP API (`sql_gate`), so roles, masks and audit are
//! the same. `pg_catalog` and `information_schema` are built per statement
//! from the caller's granted tables only.
//!
//! Each connection gets its own handlers, which hold the verified caller;
//! nothing is shared between connections but the catalog's state.

pub mod catalog;
mod handler;
mod startup;

use std::sync::{Arc, OnceLock};

use pgwire::api::PgWireServerHandlers;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::AppState;
use crate::auth::Caller;
use crate::sql_tls::SqlTls;

/// What one connection knows once it has logged in.
pub(crate) struct Connection {
    state: Arc<AppState>,
    caller: OnceLock<Caller>,
    database: OnceLock<medallion_spec::model::Layer>,
}

impl Connection {
    fn new(state: Arc<AppState>) -> Self {
        Connection {
            state,
            caller: OnceLock::new(),
            database: OnceLock::new(),
        }
    }
}

struct Handlers {
    startup: Arc<startup::JwtStartup>,
    queries: Arc<handler::Queries>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl pgwire::api::query::SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl pgwire::api::query::ExtendedQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.startup.clone()
    }
}

/// Accepts connections until shutdown; a connection's failure ends only it.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    tls: Option<SqlTls>,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(|t| t.acceptor);
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "postgres wire accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let conn = Arc::new(Connection::new(state.clone()));
        let handlers = Handlers {
            startup: Arc::new(startup::JwtStartup::new(conn.clone())),
            queries: Arc::new(handler::Queries::new(conn)),
        };
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = pgwire::tokio::process_socket(socket, acceptor, handlers) => {
                    if let Err(e) = r {
                        info!(%peer, error = %e, "postgres wire connection ended with an error");
                    }
                }
            }
        });
    }
}
