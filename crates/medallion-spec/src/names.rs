//! The public names of tables, subjects and SQL identifiers (see DESIGN.md).

use std::fmt;

use crate::contract::is_valid_name;
use crate::model::Layer;

pub const QUARANTINE_SUFFIX: &str = "__quarantine";

/// One table of the lake: `<layer>/<domain>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRef {
    pub layer: Layer,
    pub domain: String,
    pub name: String,
}

impl TableRef {
    pub fn new(layer: Layer, domain: impl Into<String>, name: impl Into<String>) -> Self {
        TableRef {
            layer,
            domain: domain.into(),
            name: name.into(),
        }
    }

    pub fn bronze(domain: &str, product: &str) -> Self {
        Self::new(Layer::Bronze, domain, product)
    }

    pub fn silver(domain: &str, product: &str) -> Self {
        Self::new(Layer::Silver, domain, product)
    }

    pub fn quarantine(domain: &str, product: &str) -> Self {
        Self::new(
            Layer::Silver,
            domain,
            format!("{product}{QUARANTINE_SUFFIX}"),
        )
    }

    pub fn gold(domain: &str, table: &str) -> Self {
        Self::new(Layer::Gold, domain, table)
    }

    /// Path below the lake root; every segment is a validated name, so it cannot escape.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.layer, self.domain, self.name)
    }

    /// `layer.domain.table` as used in SQL.
    pub fn sql_name(&self) -> String {
        format!("{}.{}.{}", self.layer, self.domain, self.name)
    }

    /// The subject on which this table's commits are announced.
    pub fn event_subject(&self) -> String {
        format!("medallion.{}.{}.{}", self.layer, self.domain, self.name)
    }

    pub fn is_quarantine(&self) -> bool {
        self.name.ends_with(QUARANTINE_SUFFIX)
    }

    /// Parses `layer.domain.table` (or `layer/domain/table`), refusing anything
    /// that is not a valid name in every segment.
    pub fn parse(s: &str) -> Option<TableRef> {
        let mut parts = s.split(['.', '/']);
        let layer = Layer::parse(parts.next()?)?;
        let domain = parts.next()?;
        let name = parts.next()?;
        if parts.next().is_some() || !is_valid_name(domain) {
            return None;
        }
        let base = name.strip_suffix(QUARANTINE_SUFFIX).unwrap_or(name);
        if !is_valid_name(base) || (base != name && layer != Layer::Silver) {
            return None;
        }
        Some(TableRef::new(layer, domain, name))
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sql_name())
    }
}

/// `medallion.ingest.<domain>.<product>` → (domain, product), if both are valid names.
pub fn parse_ingest_subject(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix("medallion.ingest.")?;
    let (domain, product) = rest.split_once('.')?;
    (is_valid_name(domain) && is_valid_name(product)).then_some((domain, product))
}

pub fn ingest_subject(domain: &str, product: &str) -> String {
    format!("medallion.ingest.{domain}.{product}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_table_names() {
        let t = TableRef::parse("silver.finance.payments__quarantine").unwrap();
        assert!(t.is_quarantine());
        assert_eq!(t.path(), "silver/finance/payments__quarantine");
        assert_eq!(
            TableRef::parse("gold/finance/rev").unwrap().sql_name(),
            "gold.finance.rev"
        );
        for bad in [
            "silver.finance",
            "silver.finance.a.b",
            "platinum.finance.x",
            "silver.fin..ance.x",
            "silver.finance.../x",
            "gold.finance.x__quarantine",
            "silver.finance.\0",
        ] {
            assert!(TableRef::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ingest_subjects() {
        assert_eq!(
            parse_ingest_subject("medallion.ingest.finance.payments"),
            Some(("finance", "payments"))
        );
        assert_eq!(
            parse_ingest_subject("medallion.ingest.finance.payments.x"),
            None
        );
        assert_eq!(
            parse_ingest_subject("medallion.ingest.Finance.payments"),
            None
        );
        assert_eq!(
            parse_ingest_subject("medallion.bronze.finance.payments"),
            None
        );
    }
}
