//! Who may read what: grants from each product's `access` section, plus the
//! `admin` role, which reads everything. Bronze and the raw `payload` of
//! quarantine rows hold unmasked input, so only a grant that names the layer
//! (bronze) or admin sees them.

use medallion_lake::query::Grant;
use medallion_spec::model::Layer;
use medallion_spec::{Contract, TableRef};

use crate::auth::Caller;

/// Every table of a product with the columns `caller` must not see, or
/// `None` for tables the caller may not read at all.
pub fn grants_for(caller: &Caller, c: &Contract) -> Vec<Grant> {
    let (d, p) = (c.domain(), c.name());
    let all: Vec<(Layer, TableRef)> = std::iter::once((Layer::Bronze, TableRef::bronze(d, p)))
        .chain([
            (Layer::Silver, TableRef::silver(d, p)),
            (Layer::Silver, TableRef::quarantine(d, p)),
        ])
        .chain(
            c.gold
                .iter()
                .map(|g| (Layer::Gold, TableRef::gold(d, &g.name))),
        )
        .collect();
    if caller.is_admin() {
        return all
            .into_iter()
            .map(|(_, table)| Grant {
                table,
                masked: vec![],
            })
            .collect();
    }
    let mut out = Vec::new();
    for (layer, table) in all {
        let entries: Vec<_> = c
            .product
            .spec
            .access
            .iter()
            .filter(|a| caller.roles.contains(&a.role) && a.layers.contains(&layer))
            .collect();
        if entries.is_empty() {
            continue;
        }
        // With several matching grants, a column is masked only if every grant masks it.
        let mut masked: Vec<String> = entries[0].mask.clone();
        masked.retain(|m| entries.iter().all(|e| e.mask.contains(m)));
        if table.is_quarantine() {
            masked.push("payload".into());
        }
        out.push(Grant { table, masked });
    }
    out
}

pub fn can_see_product(caller: &Caller, c: &Contract) -> bool {
    caller.is_admin()
        || c.product
            .spec
            .access
            .iter()
            .any(|a| caller.roles.contains(&a.role))
}
