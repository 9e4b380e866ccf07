//! Receive side of one stream: reassembly by offset.
//!
//! Fragments may arrive duplicated, reordered, and cut differently by different
//! connections. Stored data never overlaps: a new fragment only fills the gaps
//! between what is already held (the bytes at one offset are the same whichever
//! connection carried them), so containment and partial overlap need no special
//! case. A fragment without HAS_MORE marks a message end; a message is delivered
//! once every byte from the previous end to its end is present.
//!
//! Data below the contiguous prefix (`ack_offset`) sits in queues in offset
//! order, so the in-order case (every packet on a stream link) is a push and a
//! pop; only data above a gap goes into ordered maps until the gap fills.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use rangemap::RangeSet;

use super::Fragment;

/// What one packet did to the stream.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// Bytes newly stored (not duplicates, not beyond the window).
    pub(crate) accepted: usize,
    /// Bytes dropped because they lie beyond the receive window.
    pub(crate) dropped: usize,
}

#[derive(Debug, Default)]
pub(crate) struct RecvStream {
    /// Start of the next message to deliver.
    deliver_offset: u64,
    /// Everything before this offset is present (acknowledge_offset).
    contiguous: u64,
    /// End of the highest byte range received (received_max_offset).
    max_received: u64,
    /// Data in `[deliver_offset, contiguous)`, by start offset, in order and
    /// without gaps.
    ready: VecDeque<(u64, Bytes)>,
    /// Message ends in `(deliver_offset, contiguous]`, ascending.
    ready_ends: VecDeque<u64>,
    /// Data above `contiguous` (after a gap), keyed by start offset,
    /// non-overlapping.
    chunks: BTreeMap<u64, Bytes>,
    /// Message end offsets above `contiguous`.
    ends: BTreeSet<u64>,
    /// Offset ranges held above `contiguous` (reported as selective acks).
    above: RangeSet<u64>,
    /// Offset of the peer's FIN, once seen.
    fin: Option<u64>,
    /// The FIN was reached: every byte is here.
    finished: bool,
    /// `Finished` was reported to the application.
    finish_reported: bool,
}

impl RecvStream {
    /// `acknowledge_offset` to report: all before it received (the FIN counts
    /// as one offset once reached).
    pub(crate) fn ack_offset(&self) -> u64 {
        self.contiguous
    }

    /// `received_max_offset` to report.
    pub(crate) fn max_received(&self) -> u64 {
        self.max_received.max(self.contiguous)
    }

    /// The lowest `max` ranges held above the acknowledged offset.
    pub(crate) fn sack_ranges(&self, max: usize) -> impl Iterator<Item = Range<u64>> + '_ {
        self.above.iter().take(max).cloned()
    }

    /// Bytes held for reassembly.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.ready.iter().map(|(_, data)| data.len()).sum::<usize>()
            + self.chunks.values().map(Bytes::len).sum::<usize>()
    }

    #[cfg(test)]
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Start of the next message to deliver.
    pub(crate) fn deliver_offset(&self) -> u64 {
        self.deliver_offset
    }

    /// True exactly once: when the FIN was reached and every message before it
    /// was delivered.
    pub(crate) fn take_finish(&mut self) -> bool {
        if self.finished && self.ready_ends.is_empty() && self.ends.is_empty() && !self.finish_reported {
            self.finish_reported = true;
            return true;
        }
        false
    }

    /// Everything before `offset` is delivered or abandoned by the sender
    /// (RESET_OFFSET): skip to it. Never moves backwards.
    pub(crate) fn reset_to(&mut self, offset: u64) {
        if offset <= self.deliver_offset {
            return;
        }
        self.deliver_offset = offset;
        while let Some((start, data)) = self.ready.front_mut() {
            let end = *start + data.len() as u64;
            if end <= offset {
                self.ready.pop_front();
            } else {
                if *start < offset {
                    *data = data.slice((offset - *start) as usize..);
                    *start = offset;
                }
                break;
            }
        }
        while self.ready_ends.front().is_some_and(|&end| end <= offset) {
            self.ready_ends.pop_front();
        }
        self.contiguous = self.contiguous.max(offset);
        self.max_received = self.max_received.max(offset);
        let kept = self.chunks.split_off(&offset);
        if let Some((&start, data)) = self.chunks.last_key_value()
            && start + data.len() as u64 > offset
        {
            let tail = data.slice((offset - start) as usize..);
            self.chunks = kept;
            self.chunks.insert(offset, tail);
        } else {
            self.chunks = kept;
        }
        self.ends = self.ends.split_off(&(offset + 1));
        self.above.remove(0..offset);
        self.advance_contiguous();
    }

    /// Stores the fragments of one packet starting at `offset`. Data ending
    /// beyond `limit` (the receive window) is dropped, to be resent later.
    /// A whole message arriving in order with nothing held before it goes
    /// straight to `deliver` (the in-order case: a stream link's packets of
    /// small messages); the rest waits for [`RecvStream::next_message`],
    /// which the caller drains afterwards: messages leave in offset order
    /// either way.
    pub(crate) fn insert(
        &mut self,
        offset: u64,
        fragments: Vec<Fragment>,
        fin: bool,
        limit: u64,
        deliver: &mut impl FnMut(Bytes),
    ) -> Received {
        let mut received = Received::default();
        let mut position = offset;
        for fragment in fragments {
            let len = fragment.data.len() as u64;
            let start = position;
            let Some(end) = start.checked_add(len) else {
                break;
            };
            position = end;
            if len == 0 {
                continue;
            }
            if end > limit {
                received.dropped += len as usize;
                continue;
            }
            if end <= self.deliver_offset || self.finished {
                continue;
            }
            self.max_received = self.max_received.max(end);
            let has_more = fragment.has_more();
            if !has_more && start == self.deliver_offset && start == self.contiguous && self.above.is_empty() {
                // A whole message with nothing held below it (`ready` and
                // `ready_ends` lie in `[deliver_offset, contiguous)`) or
                // above it.
                self.deliver_offset = end;
                self.contiguous = end;
                received.accepted += len as usize;
                deliver(fragment.data);
                continue;
            }
            received.accepted += self.fill(start, fragment.data);
            if !has_more {
                self.add_end(end);
            }
        }
        if fin && position <= limit && self.fin.is_none() && !self.finished && position >= self.deliver_offset {
            self.fin = Some(position);
            self.max_received = self.max_received.max(position + 1);
        }
        self.advance_contiguous();
        received
    }

    /// Records a message end (above `deliver_offset`).
    fn add_end(&mut self, end: u64) {
        if end > self.contiguous {
            self.ends.insert(end);
            return;
        }
        match self.ready_ends.back() {
            None => self.ready_ends.push_back(end),
            Some(&last) if last < end => self.ready_ends.push_back(end),
            // Known already (a resent fragment), or a peer marking ends
            // inconsistently: kept sorted, once.
            _ => {
                if let Err(at) = self.ready_ends.binary_search(&end) {
                    self.ready_ends.insert(at, end);
                }
            }
        }
    }

    /// Copies the parts of `[start, start + data.len())` that are not yet held
    /// (as slices of `data`). Returns the number of new bytes.
    fn fill(&mut self, start: u64, data: Bytes) -> usize {
        let end = start + data.len() as u64;
        // In-order fast path: nothing is held above the contiguous prefix and
        // this starts right at its end, so it overlaps nothing held.
        if start == self.contiguous && start >= self.deliver_offset && self.above.is_empty() && !self.finished {
            let len = data.len();
            self.ready.push_back((start, data));
            self.contiguous = end;
            return len;
        }
        // Everything below `contiguous` is held already.
        let mut cursor = start.max(self.deliver_offset).max(self.contiguous);
        if cursor >= end {
            return 0;
        }
        let mut added = 0;
        let mut gaps = Vec::new();
        // A held chunk that starts before `cursor` may cover it.
        if let Some((&s, held)) = self.chunks.range(..=cursor).next_back() {
            cursor = cursor.max(s + held.len() as u64);
        }
        if cursor >= end {
            return 0;
        }
        for (&s, held) in self.chunks.range(cursor..end) {
            if s > cursor {
                gaps.push(cursor..s);
            }
            cursor = cursor.max(s + held.len() as u64);
        }
        if cursor < end {
            gaps.push(cursor..end);
        }
        for gap in gaps {
            let piece = data.slice((gap.start - start) as usize..(gap.end - start) as usize);
            added += piece.len();
            self.chunks.insert(gap.start, piece);
            self.above.insert(gap);
        }
        added
    }

    fn advance_contiguous(&mut self) {
        if self.contiguous < self.deliver_offset {
            self.contiguous = self.deliver_offset;
        }
        if let Some(first) = self.above.iter().next()
            && first.start <= self.contiguous
        {
            self.contiguous = self.contiguous.max(first.end);
        }
        if self.contiguous > 0 && !self.above.is_empty() {
            self.above.remove(0..self.contiguous);
        }
        // What the gap held joins the in-order queues.
        while let Some(entry) = self.chunks.first_entry()
            && *entry.key() < self.contiguous
        {
            self.ready.push_back(entry.remove_entry());
        }
        while let Some(&end) = self.ends.first()
            && end <= self.contiguous
        {
            self.ends.pop_first();
            self.add_end(end);
        }
        if self.fin == Some(self.contiguous) && !self.finished {
            // Every byte up to the FIN is here; the FIN itself takes one offset.
            self.contiguous += 1;
            self.finished = true;
        }
    }

    /// Pops the next complete message, in order.
    pub(crate) fn next_message(&mut self) -> Option<Bytes> {
        let data_end = if self.finished {
            self.contiguous - 1
        } else {
            self.contiguous
        };
        let end = *self.ready_ends.front()?;
        if end > data_end {
            return None;
        }
        self.ready_ends.pop_front();
        let len = usize::try_from(end.saturating_sub(self.deliver_offset)).unwrap_or(0);
        // One chunk (the common case) is returned as is; more are joined.
        let mut single: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        while let Some((start, mut data)) = self.ready.pop_front() {
            if start >= end {
                self.ready.push_front((start, data));
                break;
            }
            let chunk_end = start + data.len() as u64;
            if chunk_end > end {
                // Only a peer that marks boundaries inconsistently gets here.
                let rest = data.split_off((end - start) as usize);
                self.ready.push_front((end, rest));
            }
            if let Some(joined) = joined.as_mut() {
                joined.extend_from_slice(&data);
            } else if let Some(first) = single.take() {
                let mut both = BytesMut::with_capacity(len);
                both.extend_from_slice(&first);
                both.extend_from_slice(&data);
                joined = Some(both);
            } else {
                single = Some(data);
            }
        }
        self.deliver_offset = end;
        match joined {
            Some(joined) => Some(joined.freeze()),
            None => Some(single.unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(data: &[u8], has_more: bool) -> Fragment {
        Fragment::data(Bytes::copy_from_slice(data), has_more)
    }

    /// A stream whose in-order deliveries wait in `out`, ahead of what
    /// [`RecvStream::next_message`] gives.
    #[derive(Default)]
    struct Rx {
        r: RecvStream,
        out: VecDeque<Bytes>,
    }

    impl Rx {
        fn insert(&mut self, offset: u64, fragments: Vec<Fragment>, fin: bool, limit: u64) -> Received {
            self.r
                .insert(offset, fragments, fin, limit, &mut |m| self.out.push_back(m))
        }

        fn next_message(&mut self) -> Option<Bytes> {
            self.out.pop_front().or_else(|| self.r.next_message())
        }
    }

    impl std::ops::Deref for Rx {
        type Target = RecvStream;
        fn deref(&self) -> &RecvStream {
            &self.r
        }
    }

    impl std::ops::DerefMut for Rx {
        fn deref_mut(&mut self) -> &mut RecvStream {
            &mut self.r
        }
    }

    fn drain(r: &mut Rx) -> Vec<Bytes> {
        std::iter::from_fn(|| r.next_message()).collect()
    }

    /// `messages` cut into fragments (a message splits where `cuts` says)
    /// and the fragments into packets of `per_packet`: (offset, fragments).
    fn packets(messages: &[Vec<u8>], cuts: &[usize], per_packet: usize) -> Vec<(u64, Vec<Fragment>)> {
        let mut fragments = Vec::new();
        let mut offset = 0u64;
        for (i, message) in messages.iter().enumerate() {
            let cut = cuts[i % cuts.len()] % (message.len() + 1);
            if cut > 0 && cut < message.len() {
                fragments.push((offset, frag(&message[..cut], true)));
                fragments.push((offset + cut as u64, frag(&message[cut..], false)));
            } else {
                fragments.push((offset, frag(message, false)));
            }
            offset += message.len() as u64;
        }
        fragments
            .chunks(per_packet.max(1))
            .map(|chunk| (chunk[0].0, chunk.iter().map(|(_, f)| f.clone()).collect()))
            .collect()
    }

    proptest::proptest! {
        /// Packets in order, then shuffled and repeated: every message once,
        /// in order, whichever way (straight out or queued) each one took.
        #[test]
        fn messages_leave_once_and_in_order(
            messages in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..20), 1..30),
            cuts in proptest::collection::vec(0usize..40, 1..8),
            per_packet in 1usize..6,
            order in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..40),
        ) {
            let packets = packets(&messages, &cuts, per_packet);
            // Some packets early and out of order (duplicates among them),
            // then every packet in order.
            let early = order.iter().map(|i| packets[i.index(packets.len())].clone());
            let mut r = Rx::default();
            let mut got = Vec::new();
            for (offset, fragments) in early.chain(packets.iter().cloned()) {
                r.insert(offset, fragments, false, u64::MAX);
                got.extend(drain(&mut r));
            }
            let want: Vec<Bytes> = messages.iter().map(|m| Bytes::copy_from_slice(m)).collect();
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn containment_and_overlap_from_two_connections() {
        let mut r = Rx::default();
        // Connection A cuts "hello world" as [0,4) [4,11).
        r.insert(4, vec![frag(b"o world", false)], false, u64::MAX);
        assert!(drain(&mut r).is_empty());
        assert_eq!(r.ack_offset(), 0);
        assert_eq!(r.max_received(), 11);
        // Connection B sends [2,8) inside a HAS_MORE fragment: partial overlap.
        r.insert(2, vec![frag(b"llo wo", true)], false, u64::MAX);
        // Connection B sends the whole message: contains everything.
        r.insert(0, vec![frag(b"hello world", false)], false, u64::MAX);
        assert_eq!(drain(&mut r), vec![Bytes::from_static(b"hello world")]);
        assert_eq!(r.ack_offset(), 11);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn duplicates_are_ignored_and_single_fragment_is_zero_copy() {
        let mut r = Rx::default();
        let data = Bytes::from_static(b"abc");
        let f = Fragment::data(data.clone(), false);
        assert_eq!(r.insert(0, vec![f.clone()], false, u64::MAX).accepted, 3);
        assert_eq!(r.insert(0, vec![f.clone()], false, u64::MAX).accepted, 0);
        let msg = r.next_message().unwrap();
        assert_eq!(msg.as_ptr(), data.as_ptr());
        assert!(r.next_message().is_none());
        assert_eq!(r.insert(0, vec![f], false, u64::MAX).accepted, 0, "below delivered");
    }

    #[test]
    fn window_drops_and_fin_completes() {
        let mut r = Rx::default();
        let got = r.insert(0, vec![frag(b"0123456789", false)], false, 5);
        assert_eq!(got.dropped, 10);
        assert_eq!(r.ack_offset(), 0);
        r.insert(0, vec![frag(b"0123456789", false)], true, 100);
        assert_eq!(r.ack_offset(), 11, "FIN takes one offset");
        assert!(r.is_finished());
        assert_eq!(drain(&mut r), vec![Bytes::from_static(b"0123456789")]);
    }

    #[test]
    fn a_filled_gap_joins_the_in_order_data() {
        let mut r = Rx::default();
        r.insert(0, vec![frag(b"ab", false)], false, u64::MAX);
        // A gap [2, 4), then two messages above it.
        r.insert(4, vec![frag(b"ef", false), frag(b"gh", true)], false, u64::MAX);
        assert_eq!(drain(&mut r), vec![Bytes::from_static(b"ab")]);
        assert_eq!(r.ack_offset(), 2);
        r.insert(2, vec![frag(b"cd", false)], false, u64::MAX);
        assert_eq!(r.ack_offset(), 8);
        assert_eq!(
            drain(&mut r),
            vec![Bytes::from_static(b"cd"), Bytes::from_static(b"ef")]
        );
        // In order again; a reset inside held data cuts it.
        r.insert(8, vec![frag(b"ij", false), frag(b"klmn", false)], false, u64::MAX);
        r.reset_to(11); // "ghij" (gh went on) and "k" are skipped
        assert_eq!(drain(&mut r), vec![Bytes::from_static(b"lmn")]);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn reset_skips_partial_data() {
        let mut r = Rx::default();
        r.insert(0, vec![frag(b"abc", true)], false, u64::MAX);
        r.insert(10, vec![frag(b"xyz", false)], false, u64::MAX);
        r.reset_to(10);
        assert_eq!(r.ack_offset(), 13);
        assert_eq!(drain(&mut r), vec![Bytes::from_static(b"xyz")]);
        r.reset_to(5);
        assert_eq!(r.ack_offset(), 13, "reset never moves back");
    }
}
