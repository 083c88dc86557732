//! The sled backend's per-agent listing index, grouped: the tasks one group commit accepts for
//! an agent share one key instead of taking one each (#16).
//!
//! The index exists so that `GET /tasks?agent=` pages newest first without reading other
//! agents' tasks (#11). Each key is `la/<agent>\0<entry>`, an *entry* being a task's
//! `created_at` (big-endian milliseconds) and id, the order of the listing. A key's value holds
//! more entries, all after the key's own and ascending: the rest of its group. A key with an
//! empty value is one entry, as every key was before this layout, so stores written before read
//! as they are.
//!
//! One rule keeps reading simple: **no key lies inside another key's range** (between its own
//! entry and its value's last). Reading the keys backwards and each key's entries backwards then
//! gives the entries newest first, as a scan of one key per entry did. The writer keeps the rule:
//! a commit's entries newer than everything its agent has listed form one new key; an entry
//! older than that (accepted before a task of an earlier commit but staged after it, which the
//! clock's millisecond resolution makes common under load) joins the key whose range holds it,
//! or takes a key of its own when no range does. A purge takes entries out of their keys, and a
//! key that loses its own entry moves to its oldest remaining one.
//!
//! This module is pure (no sled): the value layout and the bounds a read filters with, with
//! property tests. The staging and the reader are in `sled/listed.rs`.

use crate::model::TaskId;

use super::ListCursor;

/// One task in the listing: `created_at` big-endian, then the id's bytes, so that byte order is
/// listing order ([`ListCursor`] order).
pub type Entry = [u8; 24];

/// Tag of a value that holds more entries; an empty value holds none.
const TAG: u8 = 1;

/// The entry of a task created at `created_ms` with id `id`.
pub fn entry(created_ms: u64, id: &TaskId) -> Entry {
    let mut e = [0u8; 24];
    e[..8].copy_from_slice(&created_ms.to_be_bytes());
    e[8..].copy_from_slice(id.as_bytes());
    e
}

/// The entry as a listing cursor.
pub fn cursor(e: &Entry) -> ListCursor {
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&e[..8]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&e[8..]);
    ListCursor {
        created_ms: u64::from_be_bytes(ms),
        id: TaskId::from_bytes(id),
    }
}

/// The entry a cursor stands for.
pub fn of_cursor(c: &ListCursor) -> Entry {
    entry(c.created_ms, &c.id)
}

/// The value of a key whose own entry precedes `rest` (ascending): empty when there is no rest.
pub fn encode<'a>(rest: impl ExactSizeIterator<Item = &'a Entry>) -> Vec<u8> {
    if rest.len() == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(1 + rest.len() * 24);
    out.push(TAG);
    for e in rest {
        out.extend_from_slice(e);
    }
    out
}

/// Every entry of a key whose own entry is `first` and whose value is `value`, ascending.
pub fn decode(first: &Entry, value: &[u8]) -> Result<Vec<Entry>, String> {
    let mut out = vec![*first];
    let Some((&tag, rest)) = value.split_first() else {
        return Ok(out);
    };
    if tag != TAG || rest.is_empty() || rest.len() % 24 != 0 {
        return Err(format!(
            "a listing value is empty or a tag and 24-byte entries, found {} bytes",
            value.len()
        ));
    }
    for chunk in rest.chunks_exact(24) {
        let e: Entry = chunk.try_into().expect("chunks are 24 bytes");
        if out.last().is_some_and(|last| *last >= e) {
            return Err("listing entries out of order".to_string());
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_key_of_the_earlier_layout_is_its_own_entry() {
        let e = entry(5, &TaskId::from_bytes([7; 16]));
        assert_eq!(decode(&e, &[]).unwrap(), vec![e]);
        assert_eq!(encode([].iter()), Vec::<u8>::new());
        assert_eq!(cursor(&e).created_ms, 5);
        assert_eq!(of_cursor(&cursor(&e)), e);
    }

    #[test]
    fn damaged_values_are_errors() {
        let e = entry(5, &TaskId::from_bytes([7; 16]));
        assert!(decode(&e, &[TAG]).is_err());
        assert!(decode(&e, &[2; 25]).is_err());
        assert!(decode(&e, &[TAG; 10]).is_err());
        // An entry not after the key's own.
        let mut value = vec![TAG];
        value.extend_from_slice(&e);
        assert!(decode(&e, &value).is_err());
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (0u64..1000, any::<[u8; 16]>()).prop_map(|(ms, id)| entry(ms, &TaskId::from_bytes(id)))
    }

    proptest! {
        #[test]
        fn groups_round_trip_in_listing_order(set in proptest::collection::btree_set(arb_entry(), 1..40)) {
            let all: Vec<Entry> = set.iter().copied().collect();
            let value = encode(all[1..].iter());
            prop_assert_eq!(decode(&all[0], &value).unwrap(), all.clone());
            // Byte order is cursor order.
            let cursors: BTreeSet<ListCursor> = all.iter().map(cursor).collect();
            prop_assert_eq!(cursors.into_iter().map(|c| of_cursor(&c)).collect::<Vec<_>>(), all);
        }

        #[test]
        fn any_value_decodes_or_fails_cleanly(e in arb_entry(), value in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(entries) = decode(&e, &value) {
                prop_assert!(entries.windows(2).all(|w| w[0] < w[1]));
                prop_assert_eq!(entries[0], e);
            }
        }
    }
}
