use thiserror::Error;

#[derive(Debug, Error)]
pub enum LakeError {
    #[error("lake location `{location}`: {message}")]
    Location { location: String, message: String },
    #[error("table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: deltalake::DeltaTableError,
    },
    #[error("table {table}: the batch does not match the table schema: {message}")]
    Schema { table: String, message: String },
    #[error("table {table}: version {version} does not exist (latest is {latest})")]
    NoSuchVersion {
        table: String,
        version: i64,
        latest: i64,
    },
    #[error("table {table}: no version as of {at}: {message}")]
    AsOf {
        table: String,
        at: String,
        message: String,
    },
    #[error(
        "table {table}: the rows of version {version} (file {file}) were deleted by vacuum and no compaction recorded where they went; keep spec.retention.time_travel longer than a stage may fall behind (docs/reference.md#tables-that-stay-healthy-maintenance-and-retention)"
    )]
    RowsGone {
        table: String,
        version: i64,
        file: String,
    },
    #[error("table {table}: erasure: {message}")]
    Erase { table: String, message: String },
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
    #[error(transparent)]
    DataFusion(#[from] deltalake::datafusion::error::DataFusionError),
}

impl LakeError {
    /// A file the log names is gone (vacuumed after a compaction, say).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            LakeError::ObjectStore(object_store::Error::NotFound { .. })
        )
    }

    pub fn delta(table: impl ToString, source: deltalake::DeltaTableError) -> Self {
        LakeError::Delta {
            table: table.to_string(),
            source,
        }
    }
}
