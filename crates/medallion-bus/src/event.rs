//! Stage events: "table T reached version V, and here are the rows it added".
//!
//! A commit's rows are split over as many messages as `max_payload` requires
//! (`Medallion-Part: i/n`). Each message's `Nats-Msg-Id` is derived from the
//! table, version and part, so re-announcing a commit after a crash is
//! de-duplicated by JetStream. Consumers treat events as a fast path only: the
//! table is the truth, and any version whose parts are missing, garbled or too
//! large for the bus is read back from the table.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use medallion_spec::TableRef;

use crate::{BusError, codec, headers, trace};

/// Headers and framing take some of `max_payload`; keep this much free.
const HEADER_ALLOWANCE: usize = 8 * 1024;
/// At most this many producer trace contexts ride along on an event.
pub const MAX_LINKS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Rows were appended.
    Append,
    /// The table was rewritten (full refresh): consumers rebuild from it.
    Overwrite,
    /// Rows were replaced, updated or deleted in place (a change feed's
    /// commit): consumers read the commit from the table.
    Merge,
}

impl Operation {
    pub fn as_str(&self) -> &'static str {
        match self {
            Operation::Append => "append",
            Operation::Overwrite => "overwrite",
            Operation::Merge => "merge",
        }
    }
}

/// One committed version to announce.
pub struct Commit<'a> {
    pub table: &'a TableRef,
    pub version: i64,
    pub operation: Operation,
    pub schema: SchemaRef,
    pub batches: &'a [RecordBatch],
    /// Trace contexts (W3C `traceparent`) of the inputs this commit carries, so
    /// the next stage can continue each producer's trace.
    pub links: &'a [String],
    /// The partition of the next stage that takes this version
    /// ([`medallion_spec::version_partition`]); 0 for one partition.
    pub partition: u32,
}

/// Publishes the commit's rows and waits for JetStream to store every part.
/// Returns the number of messages published.
pub async fn publish_commit(
    js: &jetstream::Context,
    commit: Commit<'_>,
    max_payload: usize,
) -> Result<usize, BusError> {
    let subject = commit.table.partition_subject(commit.partition);
    let limit = max_payload.saturating_sub(HEADER_ALLOWANCE).max(1024);
    let parts = codec::encode_split(&commit.schema, commit.batches, limit)?;
    let (payloads, in_table) = match parts {
        Some(p) => (p, false),
        None => (vec![codec::encode_empty(&commit.schema)?], true),
    };
    let n = payloads.len();
    let mut acks = Vec::with_capacity(n);
    for (i, payload) in payloads.into_iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert(headers::TABLE, commit.table.sql_name().as_str());
        h.insert(headers::TABLE_VERSION, commit.version.to_string().as_str());
        h.insert(headers::PART, format!("{}/{}", i + 1, n).as_str());
        h.insert(headers::OPERATION, commit.operation.as_str());
        if in_table {
            h.insert(headers::PAYLOAD, "table");
        }
        if i == 0 && !commit.links.is_empty() {
            let links: Vec<&str> = commit
                .links
                .iter()
                .take(MAX_LINKS)
                .map(String::as_str)
                .collect();
            h.insert(headers::LINKS, links.join(",").as_str());
        }
        trace::inject_current(&mut h);
        let msg = PublishMessage::build()
            .payload(Bytes::from(payload))
            .headers(h)
            .message_id(format!(
                "{}@{}#{}",
                commit.table.path(),
                commit.version,
                i + 1
            ));
        let ack = js
            .send_publish(subject.clone(), msg)
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.clone(),
                message: e.to_string(),
            })?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.map_err(|e| BusError::Publish {
            subject: subject.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(n)
}

/// One received message of a stage event.
#[derive(Debug, Clone)]
pub struct EventPart {
    pub table: TableRef,
    pub version: i64,
    pub part: u32,
    pub parts: u32,
    pub operation: Operation,
    pub in_table: bool,
    pub payload: Bytes,
    pub traceparent: Option<String>,
    pub links: Vec<String>,
}

impl EventPart {
    pub fn parse(
        subject: &str,
        h: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<EventPart, BusError> {
        let bad = |m: &str| BusError::MalformedEvent {
            subject: subject.to_string(),
            message: m.to_string(),
        };
        let h = h.ok_or_else(|| bad("no headers"))?;
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_string());
        let table = get(headers::TABLE)
            .and_then(|t| TableRef::parse(&t))
            .ok_or_else(|| bad("missing or invalid Medallion-Table"))?;
        if table.subject_partition(subject).is_none() {
            return Err(bad("Medallion-Table does not match the subject"));
        }
        let version: i64 = get(headers::TABLE_VERSION)
            .and_then(|v| v.parse().ok())
            .filter(|v| *v >= 0)
            .ok_or_else(|| bad("missing or invalid Medallion-Table-Version"))?;
        let (part, parts) = get(headers::PART)
            .and_then(|p| {
                let (a, b) = p.split_once('/')?;
                Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
            })
            .filter(|(a, b)| *a >= 1 && a <= b)
            .ok_or_else(|| bad("missing or invalid Medallion-Part"))?;
        let operation = match get(headers::OPERATION).as_deref() {
            Some("overwrite") => Operation::Overwrite,
            Some("merge") => Operation::Merge,
            Some("append") | None => Operation::Append,
            Some(_) => return Err(bad("invalid Medallion-Operation")),
        };
        let in_table = get(headers::PAYLOAD).as_deref() == Some("table");
        let links = get(headers::LINKS)
            .map(|l| {
                l.split(',')
                    .filter(|s| !s.is_empty())
                    .take(MAX_LINKS)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Ok(EventPart {
            table,
            version,
            part,
            parts,
            operation,
            in_table,
            payload,
            traceparent: get(headers::TRACEPARENT),
            links,
        })
    }
}

/// A commit put back together from its parts.
#[derive(Debug, Clone)]
pub struct AssembledCommit {
    pub table: TableRef,
    pub version: i64,
    pub operation: Operation,
    /// The rows, or `None` when they must be read from the table (parts
    /// missing or undecodable, or too large for the bus).
    pub batches: Option<Vec<RecordBatch>>,
    pub traceparents: Vec<String>,
    pub links: Vec<String>,
}

/// Groups parts by table and version (ascending).
pub fn assemble(parts: Vec<EventPart>) -> BTreeMap<TableRef, BTreeMap<i64, AssembledCommit>> {
    let mut grouped: BTreeMap<TableRef, BTreeMap<i64, Vec<EventPart>>> = BTreeMap::new();
    for p in parts {
        grouped
            .entry(p.table.clone())
            .or_default()
            .entry(p.version)
            .or_default()
            .push(p);
    }
    grouped
        .into_iter()
        .map(|(table, versions)| {
            let commits = versions
                .into_iter()
                .map(|(version, mut parts)| {
                    parts.sort_by_key(|p| p.part);
                    parts.dedup_by_key(|p| p.part);
                    let c = assemble_one(table.clone(), version, parts);
                    (version, c)
                })
                .collect();
            (table, commits)
        })
        .collect()
}

fn assemble_one(table: TableRef, version: i64, parts: Vec<EventPart>) -> AssembledCommit {
    let operation = parts[0].operation;
    let expected = parts[0].parts as usize;
    let complete = parts.len() == expected && parts.iter().all(|p| p.parts as usize == expected);
    let traceparents = parts.iter().filter_map(|p| p.traceparent.clone()).collect();
    let links = parts.iter().flat_map(|p| p.links.clone()).collect();
    let batches = if complete && !parts.iter().any(|p| p.in_table) {
        let mut all = Vec::new();
        let mut ok = true;
        for p in &parts {
            match codec::decode(&p.payload) {
                Ok((_, b)) => all.extend(b),
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        ok.then_some(all)
    } else {
        None
    };
    AssembledCommit {
        table,
        version,
        operation,
        batches,
        traceparents,
        links,
    }
}

/// What a batch of stage events says about one upstream table.
#[derive(Debug, Default)]
pub struct Announced {
    /// Rows per version, for the versions whose event carried them whole
    /// (every part received, appended); every other version is read from the table.
    pub rows: BTreeMap<i64, Vec<RecordBatch>>,
    /// Trace contexts the events carried, to continue downstream.
    pub links: Vec<String>,
    /// The newest version of the table these messages announced, other than
    /// parts of commits still in flight: a consumer that knows more messages
    /// are waiting stops here rather than read later versions from the table
    /// while their events are on the way.
    pub through: Option<i64>,
}

/// Parts of appends whose other parts were not in the same pull. A pull ends
/// at the batcher's limits, often inside a big commit's parts; kept here,
/// the parts join the rest of their commit in the next pull instead of the
/// whole commit being read back from the table. Bounded: the oldest commits
/// are given up (and read from the table) past [`MAX_IN_FLIGHT_BYTES`].
#[derive(Debug, Default)]
pub struct PartsInFlight {
    parts: Vec<EventPart>,
}

const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

impl PartsInFlight {
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// Groups received events by table. Malformed events are skipped (returned
/// as subjects for logging): the table is the truth and is read instead.
/// A version's rows are taken from its events when every part of an append
/// has arrived (in this pull or, kept in `in_flight`, an earlier one), and
/// only if `wanted(table, version)`: a consumer that already read a version
/// from the table would decode its rows for nothing. The links of a commit
/// in flight are given with its rows (or when it is given up), so a trace
/// continues in the pass that processes it.
pub fn announced<'a>(
    messages: impl IntoIterator<Item = (&'a str, Option<&'a HeaderMap>, &'a Bytes)>,
    wanted: impl Fn(&TableRef, i64) -> bool,
    in_flight: &mut PartsInFlight,
) -> (BTreeMap<TableRef, Announced>, Vec<String>) {
    let mut out: BTreeMap<TableRef, Announced> = BTreeMap::new();
    let mut malformed = Vec::new();
    let mut parts = Vec::new();
    for part in std::mem::take(&mut in_flight.parts) {
        if wanted(&part.table, part.version) {
            parts.push(part);
        } else {
            out.entry(part.table).or_default().links.extend(part.links);
        }
    }
    for (subject, headers, payload) in messages {
        let Ok(part) = EventPart::parse(subject, headers, payload.clone()) else {
            malformed.push(subject.to_string());
            continue;
        };
        let entry = out.entry(part.table.clone()).or_default();
        if part.operation == Operation::Append
            && !part.in_table
            && wanted(&part.table, part.version)
        {
            parts.push(part);
        } else {
            entry.through = entry.through.max(Some(part.version));
            entry.links.extend(part.links);
        }
    }
    let mut grouped: BTreeMap<(TableRef, i64), Vec<EventPart>> = BTreeMap::new();
    for p in parts {
        grouped
            .entry((p.table.clone(), p.version))
            .or_default()
            .push(p);
    }
    let mut waiting = Vec::new();
    for ((table, version), mut parts) in grouped {
        parts.sort_by_key(|p| p.part);
        parts.dedup_by_key(|p| p.part);
        let expected = parts[0].parts;
        if parts.len() < expected as usize && parts.iter().all(|p| p.parts == expected) {
            waiting.push(parts);
            continue;
        }
        let commit = assemble_one(table.clone(), version, parts);
        let entry = out.entry(table).or_default();
        entry.through = entry.through.max(Some(version));
        entry.links.extend(commit.links);
        if let Some(batches) = commit.batches {
            entry.rows.insert(version, batches);
        }
    }
    // Newest commits stay in flight; the oldest are given up past the bound.
    let mut bytes = 0usize;
    for parts in waiting.into_iter().rev() {
        bytes += parts.iter().map(|p| p.payload.len()).sum::<usize>();
        if bytes <= MAX_IN_FLIGHT_BYTES {
            in_flight.parts.extend(parts);
        } else {
            let entry = out.entry(parts[0].table.clone()).or_default();
            entry.through = entry.through.max(Some(parts[0].version));
            entry.links.extend(parts.into_iter().flat_map(|p| p.links));
        }
    }
    (out, malformed)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// The messages `publish_commit` sends for `rows` split at `limit` bytes.
    fn messages(
        table: &TableRef,
        version: i64,
        rows: i64,
        limit: usize,
    ) -> Vec<(String, HeaderMap, Bytes)> {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..rows))],
        )
        .unwrap();
        let parts = codec::encode_split(&schema, &[batch], limit)
            .unwrap()
            .unwrap();
        let n = parts.len();
        parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut h = HeaderMap::new();
                h.insert(headers::TABLE, table.sql_name().as_str());
                h.insert(headers::TABLE_VERSION, version.to_string().as_str());
                h.insert(headers::PART, format!("{}/{n}", i + 1).as_str());
                if i == 0 {
                    h.insert(
                        headers::LINKS,
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    );
                }
                (table.event_subject(), h, Bytes::from(p))
            })
            .collect()
    }

    fn rows_of(a: &Announced, version: i64) -> Option<Vec<i64>> {
        a.rows.get(&version).map(|batches| {
            batches
                .iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
                .collect()
        })
    }

    #[test]
    fn rows_come_from_complete_multi_part_appends_that_are_wanted() {
        let t = TableRef::bronze("d", "p");
        let mut msgs = messages(&t, 3, 20_000, 20_000);
        assert!(msgs.len() > 2, "the commit must need several parts");
        msgs.extend(messages(&t, 4, 10, 20_000));
        let mut missing = messages(&t, 5, 20_000, 20_000);
        missing.remove(1);
        msgs.extend(missing);
        msgs.extend(messages(&t, 6, 10, 20_000));
        let mut in_flight = PartsInFlight::default();
        let (tables, malformed) = announced(
            msgs.iter().map(|(s, h, p)| (s.as_str(), Some(h), p)),
            |_, v| v != 6,
            &mut in_flight,
        );
        assert!(malformed.is_empty());
        let a = &tables[&t];
        assert_eq!(
            rows_of(a, 3),
            Some((0..20_000).collect()),
            "all parts, in order"
        );
        assert_eq!(rows_of(a, 4), Some((0..10).collect()), "a single part");
        assert_eq!(rows_of(a, 5), None, "a part is missing: not yet");
        assert_eq!(rows_of(a, 6), None, "not wanted: not decoded");
        assert_eq!(
            a.links.len(),
            3,
            "links of every version but the one in flight"
        );
        assert_eq!(a.through, Some(6));
        assert!(
            !in_flight.is_empty(),
            "version 5 waits for its missing part"
        );

        // The missing part comes in the next pull: the commit is whole.
        let rest = messages(&t, 5, 20_000, 20_000).remove(1);
        let (tables, _) = announced(
            [(rest.0.as_str(), Some(&rest.1), &rest.2)],
            |_, _| true,
            &mut in_flight,
        );
        let a = &tables[&t];
        assert_eq!(rows_of(a, 5), Some((0..20_000).collect()));
        assert_eq!(a.links.len(), 1, "its links come with its rows");
        assert_eq!(a.through, Some(5));
        assert!(in_flight.is_empty());
    }

    #[test]
    fn parts_in_flight_are_given_up_when_read_from_the_table() {
        let t = TableRef::silver("d", "p");
        let mut part = messages(&t, 7, 20_000, 20_000);
        part.truncate(1);
        let mut in_flight = PartsInFlight::default();
        let (tables, _) = announced(
            part.iter().map(|(s, h, p)| (s.as_str(), Some(h), p)),
            |_, _| true,
            &mut in_flight,
        );
        let a = &tables[&t];
        assert!(a.rows.is_empty() && a.links.is_empty());
        assert_eq!(a.through, None, "nothing whole to stop at");
        // The consumer read version 7 from the table meanwhile.
        let (tables, _) = announced([], |_, v| v > 7, &mut in_flight);
        assert_eq!(tables[&t].links.len(), 1, "the links are not lost");
        assert!(in_flight.is_empty());
    }
}
