//! `pg_catalog` for a statement's session: the library's tables and
//! functions, built from the session's catalogs, which hold the caller's
//! granted tables and nothing else.

use std::sync::Arc;

use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider, MemorySchemaProvider};
use datafusion::prelude::SessionContext;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use medallion_spec::model::Layer;

pub fn install(ctx: &SessionContext, database: Layer) -> datafusion::error::Result<()> {
    // The database is the default catalog, with a `public` schema, even
    // when the caller holds no table in it (psql asks about it first).
    let catalog = match ctx.catalog(database.as_str()) {
        Some(c) => c,
        None => {
            let c: Arc<dyn CatalogProvider> = Arc::new(MemoryCatalogProvider::new());
            ctx.register_catalog(database.as_str(), c.clone());
            c
        }
    };
    if catalog.schema("public").is_none() {
        catalog.register_schema("public", Arc::new(MemorySchemaProvider::new()))?;
    }
    datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog(
        ctx,
        database.as_str(),
        EmptyContextProvider,
    )
    .map_err(|e| *e)
}
