//! The sled backend's queue entries, grouped: one key per agent per group commit instead of one
//! key per task (#16).
//!
//! Every queued task used to cost its own key, inserted on acceptance and removed on completion:
//! two of the six key operations a fire-and-forget request made, each a copy of a sled leaf and,
//! every few inserts, a split that rewrites the parent index node. Now the tasks one group commit
//! queues for one agent share a *segment*: one key, `q/<agent><base seq>`, whose value lists them.
//! A completion rewrites its segment without the task, and the completions of one group commit
//! that fall in the same segment rewrite it once; the last one removes the key.
//!
//! A task finds its segment without a search because its queue position says where it is: a
//! segment's position (`seq`) is [`SEGMENTED`] | a fresh sled id << [`SLOT_BITS`] | the task's
//! slot in the segment, so the segment key is the position with the slot bits cleared. Positions
//! stay unique and increasing in acceptance order, as the queue needs. Positions handed out by
//! earlier releases (sled ids, far below [`SEGMENTED`]) sort before every new one and keep their
//! one-task keys, whose value is the bare 16-byte task id; they are read and removed as before.
//!
//! This module is pure (no sled): the position arithmetic and the value layout, with property
//! tests. The staging that uses them is in `sled/queued.rs`.

use std::collections::BTreeMap;

use crate::model::TaskId;

/// Set in every position this layout hands out; clear in those of earlier releases, which are
/// sled ids (counted up from zero) and so sort first.
pub const SEGMENTED: u64 = 1 << 63;

/// Bits of a position that number the task inside its segment.
pub const SLOT_BITS: u32 = 12;

/// Most tasks one segment holds; a group commit that queues more for one agent opens another.
pub const SLOTS: u64 = 1 << SLOT_BITS;

const SLOT_MASK: u64 = SLOTS - 1;

/// Largest sled id a position can carry (the bits between [`SEGMENTED`] and the slot).
pub const MAX_BASE_ID: u64 = (SEGMENTED >> SLOT_BITS) - 1;

/// Tag of a segment value; a value without it is an earlier release's bare task id.
const TAG: u8 = 1;

/// Bytes per task in a segment value: its slot (u16, big-endian) and its id.
const ENTRY: usize = 2 + 16;

/// The position of slot 0 of a new segment built on the fresh sled id `id`; `None` beyond
/// [`MAX_BASE_ID`] (2^51 ids: centuries of group commits).
pub fn base(id: u64) -> Option<u64> {
    (id <= MAX_BASE_ID).then_some(SEGMENTED | (id << SLOT_BITS))
}

/// The segment a position is in, as the position of its slot 0, with the slot; `None` for a
/// position of an earlier release, which has a key of its own.
pub fn locate(seq: u64) -> Option<(u64, u16)> {
    (seq & SEGMENTED != 0).then_some((seq & !SLOT_MASK, (seq & SLOT_MASK) as u16))
}

/// The tasks of one segment by slot; slot order is queue order.
pub type Segment = BTreeMap<u16, TaskId>;

/// Lays out a segment's value.
pub fn encode(segment: &Segment) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + segment.len() * ENTRY);
    out.push(TAG);
    for (slot, id) in segment {
        out.extend_from_slice(&slot.to_be_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    out
}

/// Reads the value under a queue key whose position is `seq`: a segment, or an earlier release's
/// bare task id (one task at `seq`). Positions come back in queue order.
pub fn decode(seq: u64, value: &[u8]) -> Result<Vec<(u64, TaskId)>, String> {
    if let Ok(id) = <[u8; 16]>::try_from(value) {
        return Ok(vec![(seq, TaskId::from_bytes(id))]);
    }
    let Some((&TAG, entries)) = value.split_first() else {
        return Err(format!(
            "a queue entry is a 16-byte task id or a tagged segment, found {} bytes",
            value.len()
        ));
    };
    if entries.len() % ENTRY != 0 {
        return Err(format!(
            "a queue segment holds {ENTRY}-byte entries, found {} bytes",
            entries.len()
        ));
    }
    let Some((base, 0)) = locate(seq) else {
        return Err("a queue segment's key is the position of its slot 0".to_string());
    };
    let mut out = Vec::with_capacity(entries.len() / ENTRY);
    for entry in entries.chunks_exact(ENTRY) {
        let slot = u16::from_be_bytes([entry[0], entry[1]]);
        if u64::from(slot) >= SLOTS
            || out
                .last()
                .is_some_and(|&(s, _)| s >= base | u64::from(slot))
        {
            return Err(format!(
                "queue segment slot {slot} is out of range or order"
            ));
        }
        let id: [u8; 16] = entry[2..].try_into().expect("chunks are ENTRY bytes");
        out.push((base | u64::from(slot), TaskId::from_bytes(id)));
    }
    Ok(out)
}

/// Reads a segment back into the form it is staged in. An earlier release's bare task id is not
/// a segment (and is never staged as one).
pub fn decode_segment(seq: u64, value: &[u8]) -> Result<Segment, String> {
    if value.len() == 16 {
        return Err("a bare task id, not a queue segment".to_string());
    }
    Ok(decode(seq, value)?
        .into_iter()
        .map(|(seq, id)| ((seq & SLOT_MASK) as u16, id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> TaskId {
        TaskId::from_bytes([n; 16])
    }

    #[test]
    fn an_earlier_release_entry_reads_as_one_task_at_its_key() {
        assert_eq!(decode(7, &[3; 16]).unwrap(), vec![(7, id(3))]);
        assert_eq!(locate(7), None);
    }

    #[test]
    fn damaged_values_are_errors_not_panics() {
        let b = base(1).unwrap();
        for bad in [&[][..], &[9; 5], &[TAG, 0], &[TAG; 20]] {
            assert!(decode(b, bad).is_err(), "{bad:?}");
        }
        // A segment under a key that is not slot 0 of a segment.
        let value = encode(&Segment::from([(0, id(1))]));
        assert!(decode(b | 1, &value).is_err());
        assert!(decode(5, &value).is_err());
        assert!(decode_segment(b, &[1; 16]).is_err());
    }

    proptest! {
        #[test]
        fn positions_sort_in_the_order_they_are_handed_out(
            a in 0..=MAX_BASE_ID, b in 0..=MAX_BASE_ID, sa in 0..SLOTS, sb in 0..SLOTS,
            legacy in 0..SEGMENTED,
        ) {
            let pa = base(a).unwrap() | sa;
            let pb = base(b).unwrap() | sb;
            prop_assert_eq!(pa.cmp(&pb), (a, sa).cmp(&(b, sb)));
            prop_assert!(legacy < pa);
            prop_assert_eq!(locate(pa), Some((base(a).unwrap(), sa as u16)));
        }

        #[test]
        fn segments_round_trip(base_id in 0..=MAX_BASE_ID, slots in proptest::collection::btree_map(0..SLOTS as u16, any::<u8>(), 0..64)) {
            let b = base(base_id).unwrap();
            let segment: Segment = slots.into_iter().map(|(s, n)| (s, id(n))).collect();
            let value = encode(&segment);
            prop_assert_eq!(decode_segment(b, &value).unwrap(), segment.clone());
            let listed: Vec<_> = segment.iter().map(|(s, t)| (b | u64::from(*s), *t)).collect();
            prop_assert_eq!(decode(b, &value).unwrap(), listed);
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(seq in any::<u64>(), value in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(seq, &value);
            let _ = decode_segment(seq, &value);
        }
    }

    #[test]
    fn ids_beyond_the_position_space_are_refused() {
        assert!(base(MAX_BASE_ID).is_some());
        assert!(base(MAX_BASE_ID + 1).is_none());
    }
}
