//! Which live replica should hold which unit: every replica computes the
//! same answer from the same member list and unit set, so no replica has to
//! be in charge of handing work out (leases decide who actually holds a
//! unit while two replicas briefly disagree).
//!
//! Rendezvous hashing with bounded loads: each unit goes to its highest
//! scoring replica that still has room, rooms being `⌊U/M⌋` plus one more for
//! the first `U mod M` replicas to need it. Loads therefore differ by at most
//! one, and a joining or leaving replica moves few units besides its own.

use std::collections::BTreeMap;

use medallion_bus::ownership::UnitId;
use xxhash_rust::xxh3::xxh3_64;

fn score(unit: &UnitId, member: &str) -> u64 {
    xxh3_64(
        format!(
            "{}\0{}\0{}\0{member}",
            unit.domain, unit.product, unit.partition
        )
        .as_bytes(),
    )
}

/// The member each unit belongs to. Members and units may come in any order
/// and with repeats; the result depends only on the two sets.
pub fn assign<'a>(units: &'a [UnitId], members: &'a [String]) -> BTreeMap<&'a UnitId, &'a str> {
    let mut members: Vec<&str> = members.iter().map(String::as_str).collect();
    members.sort_unstable();
    members.dedup();
    let mut units: Vec<&UnitId> = units.iter().collect();
    units.sort_unstable();
    units.dedup();
    let mut out = BTreeMap::new();
    if members.is_empty() {
        return out;
    }
    let base = units.len() / members.len();
    let mut extra = units.len() % members.len();
    let mut load: BTreeMap<&str, usize> = members.iter().map(|m| (*m, 0)).collect();
    // Units in a fixed pseudo-random order, so which replicas get the extra
    // unit does not depend on product names sorting early.
    units.sort_by_key(|u| (xxh3_64(u.to_string().as_bytes()), *u));
    for u in units {
        let mut ranked: Vec<&str> = members.clone();
        ranked.sort_by_key(|m| (std::cmp::Reverse(score(u, m)), *m));
        let chosen = ranked
            .iter()
            .copied()
            .find(|m| load[m] < base)
            .or_else(|| {
                (extra > 0)
                    .then(|| ranked.iter().copied().find(|m| load[m] == base))
                    .flatten()
            })
            .expect("the rooms add up to the number of units");
        if load[chosen] == base {
            extra -= 1;
        }
        *load.get_mut(chosen).expect("a member") += 1;
        out.insert(u, chosen);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn units(products: usize, partitions: u32) -> Vec<UnitId> {
        (0..products)
            .flat_map(|p| (0..partitions).map(move |k| UnitId::new("d", format!("p{p}"), k)))
            .collect()
    }

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("replica-{i}")).collect()
    }

    fn loads(a: &BTreeMap<&UnitId, &str>, members: &[String]) -> Vec<usize> {
        members
            .iter()
            .map(|m| a.values().filter(|v| **v == m.as_str()).count())
            .collect()
    }

    proptest! {
        #[test]
        fn every_unit_has_one_member_and_loads_differ_by_at_most_one(
            products in 0usize..12, partitions in 1u32..6, n in 1usize..7, seed in any::<u64>()
        ) {
            let u = units(products, partitions);
            let m: Vec<String> = (0..n).map(|i| format!("r{}", seed.wrapping_add(i as u64))).collect();
            let a = assign(&u, &m);
            prop_assert_eq!(a.len(), u.len());
            let l = loads(&a, &m);
            let (min, max) = (l.iter().min().unwrap(), l.iter().max().unwrap());
            prop_assert!(max - min <= 1, "loads {:?}", l);
        }

        #[test]
        fn the_answer_depends_only_on_the_sets(products in 1usize..8, n in 1usize..5) {
            let u = units(products, 3);
            let m = members(n);
            let mut u2 = u.clone();
            u2.reverse();
            u2.extend(u.iter().take(2).cloned());
            let mut m2 = m.clone();
            m2.reverse();
            let a: BTreeMap<UnitId, String> = assign(&u, &m).into_iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
            let b: BTreeMap<UnitId, String> = assign(&u2, &m2).into_iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn a_joining_replica_takes_a_fair_share_and_few_others_move() {
        let u = units(6, 4);
        let m3 = members(3);
        let before = assign(&u, &m3);
        let m4 = members(4);
        let after = assign(&u, &m4);
        assert_eq!(loads(&after, &m4), vec![6, 6, 6, 6]);
        let moved_between_old = u
            .iter()
            .filter(|x| after[x] != before[x] && after[x] != "replica-3")
            .count();
        // Only units that make room for the newcomer, or follow a unit that
        // did, change hands between the old replicas.
        assert!(moved_between_old <= 6, "{moved_between_old} moved");
    }

    #[test]
    fn no_members_no_assignment() {
        assert!(assign(&units(2, 2), &[]).is_empty());
    }
}
