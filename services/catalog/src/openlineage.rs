//! A product's lineage as OpenLineage run events (spec 2-0-2), one per
//! stage, so Marquez or any OpenLineage consumer can import it: datasets
//! carry their schema facet, Gold outputs a column-lineage facet from the
//! DataFusion plan of the Gold SQL.

use medallion_spec::{Contract, TableRef};
use serde_json::{Value, json};

const PRODUCER: &str = "https://github.com/medallion-dev/medallion";
const SCHEMA_URL: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";

fn dataset(namespace: &str, name: &str, fields: Option<Vec<Value>>) -> Value {
    let mut d = json!({"namespace": namespace, "name": name});
    if let Some(fields) = fields {
        d["facets"] = json!({"schema": {
            "_producer": PRODUCER,
            "_schemaURL": "https://openlineage.io/spec/facets/1-1-1/SchemaDatasetFacet.json",
            "fields": fields,
        }});
    }
    d
}

fn fields(schema: &arrow::datatypes::Schema) -> Vec<Value> {
    schema
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
        .collect()
}

fn event(job: &str, inputs: Vec<Value>, outputs: Vec<Value>) -> Value {
    json!({
        "eventType": "COMPLETE",
        "eventTime": chrono::Utc::now().to_rfc3339(),
        "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
        // A stable run id per job: the events describe standing pipelines.
        "run": {"runId": uuid_for(job)},
        "job": {"namespace": "medallion", "name": job},
        "inputs": inputs,
        "outputs": outputs,
    })
}

/// A deterministic UUID-shaped id (version 8) from the job name.
fn uuid_for(job: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(job.as_bytes());
    let b = h.to_be_bytes();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-8{:x}{:02x}-{:x}{:x}{:02x}-{}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6] & 0x0f,
        b[7],
        0x8 | (b[8] & 0x3),
        b[8] >> 4 & 0xf,
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

pub fn events(lake: &str, c: &Contract) -> Vec<Value> {
    let (d, p) = (c.domain(), c.name());
    let subject = medallion_spec::ingest_subject(d, p);
    let bronze = TableRef::bronze(d, p).sql_name();
    let silver = TableRef::silver(d, p).sql_name();
    let quarantine = TableRef::quarantine(d, p).sql_name();
    let mut out = vec![
        event(
            &format!("medallion-ingest.{d}.{p}"),
            vec![dataset("nats", &subject, None)],
            vec![dataset(
                lake,
                &bronze,
                Some(fields(&medallion_spec::layout::bronze_schema())),
            )],
        ),
        event(
            &format!("medallion-transform.{d}.{p}"),
            vec![dataset(lake, &bronze, None)],
            vec![
                dataset(lake, &silver, Some(fields(&c.silver_schema))),
                dataset(
                    lake,
                    &quarantine,
                    Some(fields(&medallion_spec::layout::quarantine_schema())),
                ),
            ],
        ),
    ];
    for g in &c.gold {
        let gold = TableRef::gold(d, &g.name).sql_name();
        let mut output = dataset(lake, &gold, Some(fields(&g.output_schema)));
        let mut column_fields = serde_json::Map::new();
        for l in &g.lineage {
            column_fields.insert(
                l.column.clone(),
                json!({
                    "inputFields": l.sources.iter().map(|s| json!({"namespace": lake, "name": silver, "field": s})).collect::<Vec<_>>(),
                    "transformationDescription": l.transformation,
                }),
            );
        }
        output["facets"]["columnLineage"] = json!({
            "_producer": PRODUCER,
            "_schemaURL": "https://openlineage.io/spec/facets/1-2-0/ColumnLineageDatasetFacet.json",
            "fields": column_fields,
        });
        out.push(event(
            &format!("medallion-aggregate.{d}.{}", g.name),
            vec![dataset(lake, &silver, None)],
            vec![output],
        ));
    }
    out
}
