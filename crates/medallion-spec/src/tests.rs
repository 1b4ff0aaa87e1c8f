use crate::*;

const PAYMENTS: &str = include_str!("../../../products/payments.yaml");

fn with_spec_edit(edit: impl FnOnce(&mut DataProduct)) -> DataProduct {
    let mut p = parse_yaml(PAYMENTS).unwrap();
    edit(&mut p);
    p
}

async fn errors_of(p: DataProduct) -> SpecErrors {
    Contract::compile(p)
        .await
        .expect_err("spec should be refused")
}

#[tokio::test]
async fn the_sample_product_compiles() {
    let c = Contract::from_yaml(PAYMENTS).await.unwrap();
    assert_eq!(c.product.qualified_name(), "finance.payments");
    let silver: Vec<_> = c
        .silver_schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(
        silver,
        [
            "event_id",
            "ts",
            "user_id",
            "amount",
            "currency",
            "country",
            "amount_eur",
            BRONZE_SEQ_COLUMN,
            INGESTED_AT_COLUMN
        ]
    );
    assert_eq!(c.expectations.len(), 3);
    let g = &c.gold[0];
    assert_eq!(g.key_names(), ["country", "hour"]);
    let kinds: Vec<_> = g
        .aggregates
        .iter()
        .map(|a| (a.name.as_str(), a.kind))
        .collect();
    assert_eq!(
        kinds,
        [("payments", AggKind::Count), ("revenue", AggKind::Sum)]
    );
    assert_eq!(c.freshness, Some(std::time::Duration::from_secs(60)));
    let lineage: Vec<_> = g
        .lineage
        .iter()
        .map(|l| (l.column.as_str(), l.sources.join(",")))
        .collect();
    assert_eq!(
        lineage,
        [
            ("country", "country".to_string()),
            ("hour", "ts".into()),
            ("payments", "".into()),
            ("revenue", "amount".into())
        ]
    );
}

#[tokio::test]
async fn every_problem_is_reported_with_its_field() {
    let p = with_spec_edit(|p| {
        p.metadata.name = "Payments".into();
        p.spec.key = vec!["nope".into()];
        p.spec.expectations[0].rule = "amount_x > 0".into();
        p.spec.derive[0].expr = "amount +".into();
        p.spec.gold[0].sql =
            "SELECT country, median(amount) AS m FROM silver GROUP BY country".into();
        p.spec.sla.as_mut().unwrap().freshness = "soon".into();
        p.spec.retention = Some(crate::model::Retention {
            time_travel: Some("a week".into()),
            bronze: Some("0s".into()),
        });
        p.spec.dedupe = Some(crate::model::Dedupe {
            within: "later".into(),
        });
    });
    let errs = errors_of(p).await;
    let fields: Vec<_> = errs.fields().collect();
    for f in [
        "metadata.name",
        "spec.key[0]",
        "spec.expectations[0].rule",
        "spec.derive[0].expr",
        "spec.gold[0].sql",
        "spec.sla.freshness",
        "spec.retention.time_travel",
        "spec.retention.bronze",
        "spec.dedupe.within",
    ] {
        assert!(fields.contains(&f), "missing {f} in {errs}");
    }
    let text = errs.to_string();
    assert!(text.contains("median"), "{text}");
    assert!(text.contains("amount_x"), "{text}");
}

#[test]
fn unknown_type_names_the_field() {
    let text = PAYMENTS.replace("type: float64", "type: money");
    let errs = parse_yaml(&text).unwrap_err();
    assert_eq!(errs.0[0].field, "spec.schema[3].type", "{errs}");
    assert!(errs.to_string().contains("unknown type `money`"), "{errs}");
}

#[test]
fn unknown_fields_are_refused() {
    let text = PAYMENTS.replace("  owner:", "  ownr: x\n  owner:");
    let errs = parse_yaml(&text).unwrap_err();
    assert!(errs.to_string().contains("ownr"), "{errs}");
}

#[tokio::test]
async fn unsupported_gold_shapes_are_refused_with_a_reason() {
    for (sql, needle) in [
        (
            "SELECT country, count(DISTINCT user_id) AS u FROM silver GROUP BY country",
            "DISTINCT",
        ),
        (
            "SELECT country, sum(amount) / count(*) AS r FROM silver GROUP BY country",
            "single aggregate",
        ),
        (
            "SELECT country, count(*) AS n FROM silver GROUP BY country ORDER BY n",
            "ORDER BY",
        ),
        (
            "SELECT country, count(*) AS n FROM silver GROUP BY country HAVING count(*) > 1",
            "HAVING",
        ),
        (
            "SELECT count(*) AS n FROM silver GROUP BY country",
            "add the GROUP BY expression",
        ),
        (
            "SELECT country, count(*) FROM silver GROUP BY country",
            "give `count(*)` a column name",
        ),
        ("SELECT country FROM silver", "GROUP BY"),
        (
            "SELECT country, count(*) AS n FROM bronze GROUP BY country",
            "bronze",
        ),
        (
            "SELECT country, sum(nope) AS n FROM silver GROUP BY country",
            "nope",
        ),
    ] {
        let p = with_spec_edit(|p| p.spec.gold[0].sql = sql.into());
        let errs = errors_of(p).await;
        assert_eq!(errs.0[0].field, "spec.gold[0].sql", "{sql}: {errs}");
        assert!(
            errs.to_string().contains(needle),
            "{sql}: expected `{needle}` in: {errs}"
        );
    }
}

#[tokio::test]
async fn supported_gold_shapes_compile() {
    for sql in [
        "SELECT count(*) AS n FROM silver",
        "SELECT country, avg(amount) AS a, min(ts) AS first, max(ts) AS last FROM silver WHERE amount > 10 GROUP BY country",
        "SELECT country AS c, count(amount) AS n FROM silver GROUP BY 1",
        "SELECT currency, sum(amount_eur) AS eur FROM (SELECT * FROM silver WHERE country = 'DE') t GROUP BY currency",
    ] {
        let p = with_spec_edit(|p| p.spec.gold[0].sql = sql.into());
        let c = Contract::compile(p)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert!(!c.gold[0].partial_exprs.is_empty());
    }
}

#[tokio::test]
async fn pii_hash_needs_a_string_and_masks_need_columns() {
    let p = with_spec_edit(|p| {
        p.spec.schema[3].pii = Some(PiiMode::Hash);
        p.spec.access[1].mask = vec!["ssn".into()];
    });
    let errs = errors_of(p).await;
    let fields: Vec<_> = errs.fields().collect();
    assert!(fields.contains(&"spec.schema[3].pii"), "{errs}");
    assert!(fields.contains(&"spec.access[1].mask[0]"), "{errs}");
}

#[tokio::test]
async fn expectations_must_be_predicates() {
    let p = with_spec_edit(|p| p.spec.expectations[0].rule = "amount + 1".into());
    let errs = errors_of(p).await;
    assert!(
        errs.to_string().contains("not a true/false predicate"),
        "{errs}"
    );
}

#[test]
fn names_cannot_escape_paths() {
    for bad in [
        "../x", "a/b", "a.b", "x\0", "a'b", "A", "", "a__b", "_x", "a b",
    ] {
        assert!(!is_valid_name(bad), "{bad:?}");
    }
    assert!(is_valid_name("payments_v2"));
}

async fn compiled(p: DataProduct) -> Contract {
    Contract::compile(p).await.unwrap()
}

fn column(name: &str, ty: &str, required: bool) -> Column {
    serde_yaml::from_str(&format!(
        "{{name: {name}, type: {ty}, required: {required}}}"
    ))
    .unwrap()
}

#[tokio::test]
async fn compatible_changes_are_accepted() {
    let old = compiled(parse_yaml(PAYMENTS).unwrap()).await;
    let new = compiled(with_spec_edit(|p| {
        p.spec.schema.push(column("channel", "string", false));
        p.spec.tags.push("cards".into());
        p.spec.description = "changed".into();
    }))
    .await;
    assert_eq!(breaking_changes(&old, &new), Vec::<String>::new());
}

#[tokio::test]
async fn each_breaking_change_is_named() {
    let old = compiled(parse_yaml(PAYMENTS).unwrap()).await;
    let new = compiled(with_spec_edit(|p| {
        let country = p
            .spec
            .schema
            .iter_mut()
            .find(|c| c.name == "country")
            .unwrap();
        country.name = "country_code".into();
        let amount = p
            .spec
            .schema
            .iter_mut()
            .find(|c| c.name == "amount")
            .unwrap();
        amount.required = true;
        p.spec.schema.push(column("channel", "string", true));
        p.spec.key = vec!["event_id".into(), "ts".into()];
        for g in &mut p.spec.gold {
            g.sql = g.sql.replace("country", "country_code");
        }
        for e in &mut p.spec.expectations {
            e.rule = e.rule.replace("country", "country_code");
        }
    }))
    .await;
    let changes = breaking_changes(&old, &new);
    let all = changes.join("\n");
    assert!(
        all.contains("silver: column country is removed (renamed to country_code"),
        "{all}"
    );
    assert!(
        all.contains("silver: column amount becomes required"),
        "{all}"
    );
    assert!(
        all.contains("silver: new column channel is required"),
        "{all}"
    );
    assert!(
        all.contains("key changes from [event_id] to [event_id, ts]"),
        "{all}"
    );
    assert!(
        all.contains("gold table revenue_by_country_hourly: column country is removed"),
        "{all}"
    );
}

#[tokio::test]
async fn a_retyped_column_and_a_changed_gold_query_are_breaking() {
    let old = compiled(parse_yaml(PAYMENTS).unwrap()).await;
    let new = compiled(with_spec_edit(|p| {
        let c = p
            .spec
            .schema
            .iter_mut()
            .find(|c| c.name == "country")
            .unwrap();
        c.data_type = "int64".parse().unwrap();
    }))
    .await;
    let all = breaking_changes(&old, &new).join("\n");
    assert!(
        all.contains("column country changes type from Utf8 to Int64"),
        "{all}"
    );

    let new = compiled(with_spec_edit(|p| {
        p.spec.gold[0].sql = p.spec.gold[0]
            .sql
            .replace("FROM silver", "FROM silver WHERE amount > 100");
    }))
    .await;
    let all = breaking_changes(&old, &new).join("\n");
    assert!(all.contains("its SQL changes"), "{all}");
}

#[tokio::test]
async fn retention_is_read_from_the_spec() {
    let p = with_spec_edit(|p| {
        p.spec.retention = Some(crate::model::Retention {
            time_travel: Some("7d".into()),
            bronze: Some("90d".into()),
        });
        p.spec.dedupe = Some(crate::model::Dedupe {
            within: "2d".into(),
        });
    });
    let c = Contract::compile(p).await.expect("valid");
    assert_eq!(
        c.dedupe_within,
        Some(std::time::Duration::from_secs(2 * 86400))
    );
    assert_eq!(
        c.time_travel,
        Some(std::time::Duration::from_secs(7 * 86400))
    );
    assert_eq!(
        c.bronze_retention,
        Some(std::time::Duration::from_secs(90 * 86400))
    );
}

#[tokio::test]
async fn a_change_feed_adds_its_sequence_columns() {
    let scd = |stored_as: &str, seq: &str| {
        with_spec_edit(|p| {
            p.spec.cdc = Some(
                serde_yaml::from_str(&format!(
                    "{{format: debezium, sequence_by: {seq}, stored_as: {stored_as}}}"
                ))
                .unwrap(),
            );
        })
    };
    let c = Contract::compile(scd("scd1", "source.lsn")).await.unwrap();
    let last = c.silver_schema.fields().last().unwrap();
    assert_eq!(
        (last.name().as_str(), last.data_type()),
        (CDC_SEQUENCE_COLUMN, &arrow::datatypes::DataType::Int64)
    );
    let c = Contract::compile(scd("scd2", "[source.file, source.pos]"))
        .await
        .unwrap();
    let names: Vec<_> = c
        .silver_schema
        .fields()
        .iter()
        .rev()
        .take(2)
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect();
    assert_eq!(
        names,
        [
            (
                CDC_END_COLUMN.to_string(),
                arrow::datatypes::DataType::Utf8,
                true
            ),
            (
                CDC_START_COLUMN.to_string(),
                arrow::datatypes::DataType::Utf8,
                false
            )
        ]
    );
    assert_eq!(
        c.cdc.unwrap().sequence_paths,
        [vec!["source", "file"], vec!["source", "pos"]]
    );
}

#[tokio::test]
async fn change_feed_mistakes_name_their_field_and_fix() {
    let p = with_spec_edit(|p| {
        p.spec.key.clear();
        p.spec.partitions = 4;
        p.spec.source.format = SourceFormat::Csv;
        p.spec.dedupe = Some(Dedupe {
            within: "1d".into(),
        });
        p.spec.cdc = Some(
            serde_yaml::from_str("{format: generic, sequence_by: lsn, keep_deletes_for: soon}")
                .unwrap(),
        );
    });
    let text = errors_of(p).await.to_string();
    for expected in [
        "spec.key: a change feed",
        "spec.partitions: a change feed",
        "spec.dedupe: a change feed",
        "spec.cdc.operation: format: generic needs",
        "spec.cdc.sequence_by: `lsn` is not a declared column",
        "spec.cdc.keep_deletes_for: `soon` is not a duration",
        "spec.source.format: change events are JSON records",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    let p = with_spec_edit(|p| {
        p.spec.cdc = Some(
            serde_yaml::from_str("{format: debezium, sequence_by: source.lsn, operation: op}")
                .unwrap(),
        );
    });
    assert!(
        errors_of(p)
            .await
            .to_string()
            .contains("spec.cdc.operation: Debezium events carry")
    );
}
