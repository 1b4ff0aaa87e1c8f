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

    /// The subject on which this table's commits are announced (partition 0).
    pub fn event_subject(&self) -> String {
        format!("medallion.{}.{}.{}", self.layer, self.domain, self.name)
    }

    /// The subject of one partition's events: partition 0 keeps the plain
    /// subject, so a product with one partition is announced exactly as
    /// before partitions existed; partition k > 0 adds a token `.k`.
    pub fn partition_subject(&self, partition: u32) -> String {
        match partition {
            0 => self.event_subject(),
            k => format!("{}.{k}", self.event_subject()),
        }
    }

    /// The partition an event subject names, if it is one of this table's.
    pub fn subject_partition(&self, subject: &str) -> Option<u32> {
        let base = self.event_subject();
        let rest = subject.strip_prefix(base.as_str())?;
        if rest.is_empty() {
            return Some(0);
        }
        let k: u32 = rest.strip_prefix('.')?.parse().ok()?;
        // One spelling per partition: `.0` and `.01` are not subjects we publish.
        (k > 0 && rest[1..] == k.to_string()).then_some(k)
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

/// Keyed publishes (`medallion.ingest.<domain>.<product>.<key>`) are stored
/// by the ingest stream under one of this many slots in place of the key
/// (the stream's subject transform hashes the key token); partitions take
/// slots, so a partition count may change while messages wait.
pub const INGEST_SLOTS: u32 = 32;

/// Where a raw message waits in the ingest stream: the plain subject, or
/// one slot of keyed publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IngestSlot {
    Plain,
    Keyed(u32),
}

impl IngestSlot {
    /// The partition of a product with `partitions` partitions that lands
    /// this slot: plain publishes go to partition 0, keyed slot s to s mod n.
    pub fn partition(self, partitions: u32) -> u32 {
        match self {
            IngestSlot::Plain => 0,
            IngestSlot::Keyed(s) => s % partitions.max(1),
        }
    }
}

/// `medallion.ingest.<domain>.<product>` (or a keyed slot of it,
/// `….<slot>` as the ingest stream stores it) → (domain, product), if both
/// are valid names.
pub fn parse_ingest_subject(subject: &str) -> Option<(&str, &str)> {
    parse_ingest_slot(subject).map(|(d, p, _)| (d, p))
}

/// Like [`parse_ingest_subject`], with the slot.
pub fn parse_ingest_slot(subject: &str) -> Option<(&str, &str, IngestSlot)> {
    let rest = subject.strip_prefix("medallion.ingest.")?;
    let mut it = rest.split('.');
    let (domain, product) = (it.next()?, it.next()?);
    let slot = match it.next() {
        None => IngestSlot::Plain,
        Some(t) => {
            let s: u32 = t.parse().ok().filter(|s| *s < INGEST_SLOTS)?;
            if t != s.to_string() || it.next().is_some() {
                return None;
            }
            IngestSlot::Keyed(s)
        }
    };
    (is_valid_name(domain) && is_valid_name(product)).then_some((domain, product, slot))
}

/// The ingest stream subject of a slot.
pub fn ingest_slot_subject(domain: &str, product: &str, slot: IngestSlot) -> String {
    match slot {
        IngestSlot::Plain => ingest_subject(domain, product),
        IngestSlot::Keyed(s) => format!("{}.{s}", ingest_subject(domain, product)),
    }
}

/// Upstream versions are dealt to partitions in blocks of this many, so a
/// replica's run of versions — one commit — spans a block: a product split
/// over replicas changes hands in the commit chain once per block instead
/// of once per version.
pub const VERSION_BLOCK: i64 = 4;

/// The partition whose consumers receive the event of upstream version
/// `version`: blocks of [`VERSION_BLOCK`] versions are dealt round-robin,
/// so every partition of a stage gets an even share whatever the producers
/// do.
pub fn version_partition(version: i64, partitions: u32) -> u32 {
    (version
        .div_euclid(VERSION_BLOCK)
        .rem_euclid(i64::from(partitions.max(1)))) as u32
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
    fn partition_subjects() {
        let t = TableRef::bronze("finance", "payments");
        assert_eq!(t.partition_subject(0), "medallion.bronze.finance.payments");
        assert_eq!(
            t.partition_subject(3),
            "medallion.bronze.finance.payments.3"
        );
        for k in [0, 1, 3, 31] {
            assert_eq!(t.subject_partition(&t.partition_subject(k)), Some(k));
        }
        for bad in [
            "medallion.bronze.finance.payments.0",
            "medallion.bronze.finance.payments.01",
            "medallion.bronze.finance.payments_x",
            "medallion.bronze.finance.payments.x",
            "medallion.silver.finance.payments",
        ] {
            assert_eq!(t.subject_partition(bad), None, "{bad}");
        }
        assert_eq!(version_partition(3, 4), 0);
        assert_eq!(version_partition(7, 4), 1);
        assert_eq!(version_partition(15, 4), 3);
        assert_eq!(version_partition(16, 4), 0);
        assert_eq!(version_partition(7, 1), 0);
        assert_eq!(version_partition(7, 0), 0);
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
            parse_ingest_slot("medallion.ingest.finance.payments.31"),
            Some(("finance", "payments", IngestSlot::Keyed(31)))
        );
        for bad in ["32", "07", "-1", "1.2", ""] {
            assert_eq!(
                parse_ingest_slot(&format!("medallion.ingest.finance.payments.{bad}")),
                None,
                "{bad}"
            );
        }
        assert_eq!(IngestSlot::Keyed(13).partition(4), 1);
        assert_eq!(IngestSlot::Plain.partition(4), 0);
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
