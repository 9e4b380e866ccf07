//! Send side of one stream: the user's messages addressed by byte offset, the
//! ranges still to (re)send, and the cumulative acknowledgement.

use std::collections::VecDeque;
use std::ops::Range;

use bytes::Bytes;
use rangemap::RangeSet;

use super::{FRAGMENT_OVERHEAD, Fragment, SendError, StreamId};
use crate::proto::AtbusPacketFlagType;

/// Fragments a packet's list is sized for up front at most (48 KiB); more
/// grow it.
const MAX_PRESIZED_FRAGMENTS: usize = 1024;

/// A packet's worth of stream data cut from the send buffer.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) offset: u64,
    pub(crate) flags: i32,
    pub(crate) fragments: Vec<Fragment>,
    /// Offsets this packet covers (one past its data for a FIN).
    pub(crate) range: Range<u64>,
}

#[derive(Debug)]
pub(crate) struct SendStream {
    id: StreamId,
    /// Messages not yet fully acknowledged, in offset order: (offset, data).
    messages: VecDeque<(u64, Bytes)>,
    /// Offset the next message will take.
    write_offset: u64,
    /// Everything before this offset is acknowledged.
    acked: u64,
    /// Offsets below `fresh` that must be retransmitted.
    unsent: RangeSet<u64>,
    /// Everything from here to `end()` was never sent: new messages extend
    /// it without touching `unsent` (a range-set insert per message was the
    /// costliest part of `push`).
    fresh: u64,
    /// Ranges above `acked` the peer reported holding (selective acks): never
    /// resent, since receivers do not renege.
    sacked: RangeSet<u64>,
    /// Offset of the FIN: it occupies one offset after the last byte, as TCP's
    /// FIN occupies a sequence number, so that it is acknowledged like data.
    fin: Option<u64>,
    /// Bytes retained before `send` answers WouldBlock.
    window: usize,
    /// A `send` was refused: raise Writable when space frees up.
    blocked: bool,
    /// No acknowledgement yet from the current receiver: packets that start
    /// at the first retained message carry RESET_OFFSET so that a receiver
    /// that never saw earlier offsets starts there.
    reset_pending: bool,
}

impl SendStream {
    pub(crate) fn new(id: StreamId, window: usize) -> Self {
        Self {
            id,
            messages: VecDeque::new(),
            write_offset: 0,
            acked: 0,
            unsent: RangeSet::new(),
            fresh: 0,
            sacked: RangeSet::new(),
            fin: None,
            window,
            blocked: false,
            reset_pending: true,
        }
    }

    /// Bytes held for possible retransmission.
    pub(crate) fn retained(&self) -> u64 {
        self.messages
            .front()
            .map_or(0, |(offset, _)| self.write_offset - offset)
    }

    /// Drops every message not fully acknowledged; returns how many and
    /// their bytes. Offsets are kept: the next message starts after the
    /// dropped ones and carries RESET_OFFSET, so a receiver that still has
    /// this stream skips the gap instead of taking new data for old.
    pub(crate) fn abandon(&mut self) -> (u64, u64) {
        let bytes = self.messages.iter().map(|(_, m)| m.len() as u64).sum();
        let count = self.messages.len() as u64;
        self.messages.clear();
        self.unsent = RangeSet::new();
        self.sacked = RangeSet::new();
        self.acked = self.end();
        self.fresh = self.end();
        self.blocked = false;
        self.reset_pending = true;
        (count, bytes)
    }

    pub(crate) fn push(&mut self, data: Bytes, max_message_len: usize) -> Result<(), SendError> {
        if self.fin.is_some() {
            return Err(SendError::Finished { stream_id: self.id });
        }
        if data.is_empty() {
            return Err(SendError::EmptyMessage { stream_id: self.id });
        }
        if data.len() > max_message_len {
            return Err(SendError::MessageTooLarge {
                stream_id: self.id,
                len: data.len(),
                max: max_message_len,
            });
        }
        let retained = self.retained();
        // A message larger than the window is accepted into an empty stream,
        // otherwise it could never be sent.
        if retained > 0 && retained + data.len() as u64 > self.window as u64 {
            self.blocked = true;
            return Err(SendError::WouldBlock {
                stream_id: self.id,
                window: self.window,
            });
        }
        let start = self.write_offset;
        self.write_offset += data.len() as u64;
        self.messages.push_back((start, data));
        Ok(())
    }

    pub(crate) fn finish(&mut self) -> Result<(), SendError> {
        if self.fin.is_some() {
            return Err(SendError::Finished { stream_id: self.id });
        }
        // Its offset is past `fresh`, hence unsent.
        self.fin = Some(self.write_offset);
        Ok(())
    }

    /// End of the offset space in use (including the FIN's offset).
    fn end(&self) -> u64 {
        self.fin.map_or(self.write_offset, |fin| fin + 1)
    }

    pub(crate) fn has_unsent(&self) -> bool {
        !self.unsent.is_empty() || self.fresh < self.end()
    }

    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }

    /// Whether all data, and the FIN if any, is acknowledged.
    pub(crate) fn is_drained(&self) -> bool {
        self.acked == self.end()
    }

    pub(crate) fn is_finished_and_acked(&self) -> bool {
        self.fin.is_some() && self.is_drained()
    }

    /// Puts a lost range back for retransmission, minus what the peer holds.
    pub(crate) fn requeue(&mut self, range: Range<u64>) {
        let start = range.start.max(self.acked);
        let end = range.end.min(self.fresh);
        if start >= end {
            return;
        }
        let missing: Vec<Range<u64>> = self.sacked.gaps(&(start..end)).collect();
        for gap in missing {
            self.unsent.insert(gap);
        }
    }

    /// Records a range the peer reported holding. `Err` if it covers offsets
    /// never sent.
    pub(crate) fn on_sack(&mut self, range: Range<u64>) -> Result<(), ()> {
        if range.end > self.end() {
            return Err(());
        }
        let start = range.start.max(self.acked);
        if start < range.end {
            self.sacked.insert(start..range.end);
            self.unsent.remove(start..range.end);
            // Never sent, yet held: a confused peer; sending it costs
            // nothing but bytes, so `fresh` stays.
        }
        Ok(())
    }

    /// Whether the peer holds all of `range` (acknowledged or selectively).
    pub(crate) fn is_received(&self, range: &Range<u64>) -> bool {
        range.end <= self.acked
            || self
                .sacked
                .get(&range.start.max(self.acked))
                .is_some_and(|r| r.end >= range.end)
    }

    /// Resends everything still retained, announcing the reset point again:
    /// the receiver is a new incarnation that has seen nothing.
    pub(crate) fn restart(&mut self) {
        self.reset_pending = true;
        self.sacked = RangeSet::new();
        let start = self.messages.front().map_or(self.write_offset, |(offset, _)| *offset);
        if start < self.fresh {
            self.unsent.insert(start..self.fresh);
        }
    }

    /// Applies a cumulative acknowledgement. Returns whether the stream turned
    /// writable. Offsets beyond what was sent are ignored (`Err`).
    pub(crate) fn on_ack(&mut self, acknowledged: u64) -> Result<bool, ()> {
        if acknowledged > self.end() {
            return Err(());
        }
        self.reset_pending = false;
        if acknowledged <= self.acked {
            return Ok(false);
        }
        self.acked = acknowledged;
        self.unsent.remove(0..acknowledged);
        self.fresh = self.fresh.max(acknowledged);
        self.sacked.remove(0..acknowledged);
        while let Some((offset, data)) = self.messages.front() {
            if offset + data.len() as u64 > acknowledged {
                break;
            }
            self.messages.pop_front();
        }
        if self.blocked && self.retained() < self.window as u64 {
            self.blocked = false;
            return Ok(true);
        }
        Ok(false)
    }

    /// Cuts the next packet: the first unsent range, up to `budget` bytes of
    /// fragment payload plus per-fragment overhead. Fragments are slices of the
    /// user's `Bytes`: no payload is copied.
    pub(crate) fn next_chunk(&mut self, budget: usize) -> Option<Chunk> {
        let first = match self.unsent.iter().next() {
            // A resend that reaches the never-sent part goes on into it.
            Some(range) if range.end >= self.fresh => range.start..self.end(),
            Some(range) => range.clone(),
            None if self.fresh < self.end() => self.fresh..self.end(),
            None => return None,
        };
        if Some(first.start) == self.fin {
            self.consume(first.start..first.start + 1);
            return Some(Chunk {
                offset: first.start,
                flags: AtbusPacketFlagType::FinishStream as i32,
                fragments: Vec::new(),
                range: first.start..first.start + 1,
            });
        }
        let data_end = first.end.min(self.write_offset);
        let mut index = self
            .messages
            .partition_point(|(offset, data)| offset + data.len() as u64 <= first.start);
        let mut position = first.start;
        let mut left = budget;
        // Sized for the messages the budget can hold (a 64 KiB packet of 64 B
        // messages holds about a thousand) rather than grown by doubling.
        let room = (budget / (FRAGMENT_OVERHEAD + 1)).min(MAX_PRESIZED_FRAGMENTS);
        let mut fragments = Vec::with_capacity(self.messages.len().saturating_sub(index).min(room));
        while position < data_end && left > FRAGMENT_OVERHEAD {
            let Some((offset, data)) = self.messages.get(index) else {
                break;
            };
            let message_end = offset + data.len() as u64;
            let want = data_end.min(message_end) - position;
            // A message that fits whole in a packet of its own goes whole into
            // the next one rather than split: the receiver joins a split
            // message by copying it (at 16 KiB and a 64 KiB packet, one message
            // in four was).
            if !fragments.is_empty()
                && want > (left - FRAGMENT_OVERHEAD) as u64
                && want + FRAGMENT_OVERHEAD as u64 <= budget as u64
            {
                break;
            }
            let take = want.min((left - FRAGMENT_OVERHEAD) as u64);
            let from = (position - offset) as usize;
            let piece = data.slice(from..from + take as usize);
            let has_more = position + take < message_end;
            fragments.push(Fragment::data(piece, has_more));
            left -= take as usize + FRAGMENT_OVERHEAD;
            position += take;
            if !has_more {
                index += 1;
            }
        }
        if fragments.is_empty() {
            return None;
        }
        let mut flags = 0;
        let reset_point = self.messages.front().map(|(offset, _)| *offset);
        if self.reset_pending && reset_point == Some(first.start) {
            flags |= AtbusPacketFlagType::ResetOffset as i32;
        }
        // The FIN rides on the packet that carries the last byte when it fits.
        let mut range_end = position;
        if Some(position) == self.fin && (position >= self.fresh || self.unsent.contains(&position)) {
            flags |= AtbusPacketFlagType::FinishStream as i32;
            range_end = position + 1;
        }
        self.consume(first.start..range_end);
        Some(Chunk {
            offset: first.start,
            flags,
            fragments,
            range: first.start..range_end,
        })
    }
}

impl SendStream {
    /// `range` goes out now: no longer unsent.
    fn consume(&mut self, range: Range<u64>) {
        if range.start < self.fresh {
            self.unsent.remove(range.start..range.end.min(self.fresh));
        }
        self.fresh = self.fresh.max(range.end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> SendStream {
        SendStream::new(1, 1 << 20)
    }

    #[test]
    fn packs_many_small_messages_and_marks_boundaries() {
        let mut s = stream();
        for i in 0..10u8 {
            s.push(Bytes::from(vec![i; 10]), 1 << 20).unwrap();
        }
        let chunk = s.next_chunk(1000).unwrap();
        assert_eq!(chunk.fragments.len(), 10);
        assert!(chunk.fragments.iter().all(|f| !f.has_more()));
        assert_eq!(chunk.range, 0..100);
        assert!(chunk.flags & AtbusPacketFlagType::ResetOffset as i32 != 0);
        assert!(s.next_chunk(1000).is_none());
    }

    #[test]
    fn splits_large_message_with_has_more() {
        let mut s = stream();
        s.push(Bytes::from(vec![7; 1000]), 1 << 20).unwrap();
        let mut total = 0;
        let mut last = None;
        while let Some(chunk) = s.next_chunk(100 + FRAGMENT_OVERHEAD) {
            assert_eq!(chunk.fragments.len(), 1);
            total += chunk.fragments[0].data.len();
            last = Some(chunk.fragments[0].has_more());
            if total < 1000 {
                assert_eq!(last, Some(true));
            }
        }
        assert_eq!(total, 1000);
        assert_eq!(last, Some(false));
    }

    /// A message that would fit a packet of its own is not split across two
    /// (the receiver would join it by copy); one larger than a packet is.
    #[test]
    fn a_message_that_fits_the_next_packet_is_not_split() {
        let mut s = stream();
        for i in 0..3u8 {
            s.push(Bytes::from(vec![i; 100]), 1 << 20).unwrap();
        }
        s.push(Bytes::from(vec![3; 400]), 1 << 20).unwrap();
        let budget = 250 + 2 * FRAGMENT_OVERHEAD;
        let whole = |c: &Chunk| {
            c.fragments
                .iter()
                .map(|f| (f.data.len(), f.has_more()))
                .collect::<Vec<_>>()
        };
        let first = s.next_chunk(budget).unwrap();
        assert_eq!(whole(&first), vec![(100, false), (100, false)], "the third waits");
        let second = s.next_chunk(budget).unwrap();
        assert_eq!(
            whole(&second),
            vec![(100, false), (150, true)],
            "a message past the budget is cut"
        );
        let third = s.next_chunk(budget).unwrap();
        assert_eq!(whole(&third), vec![(250, false)]);
        assert!(s.next_chunk(budget).is_none());
    }

    #[test]
    fn requeue_after_ack_only_resends_unacked() {
        let mut s = stream();
        s.push(Bytes::from(vec![1; 300]), 1 << 20).unwrap();
        let chunk = s.next_chunk(10_000).unwrap();
        assert_eq!(chunk.range, 0..300);
        assert_eq!(s.on_ack(100), Ok(false));
        s.requeue(chunk.range);
        let again = s.next_chunk(10_000).unwrap();
        assert_eq!(again.range, 100..300);
        assert_eq!(again.flags & AtbusPacketFlagType::ResetOffset as i32, 0);
        assert_eq!(s.on_ack(301), Err(()), "ack beyond sent data is refused");
    }

    #[test]
    fn fin_occupies_one_offset() {
        let mut s = stream();
        s.push(Bytes::from_static(b"abc"), 1 << 20).unwrap();
        s.finish().unwrap();
        let chunk = s.next_chunk(10_000).unwrap();
        assert_eq!(chunk.range, 0..4);
        assert!(chunk.flags & AtbusPacketFlagType::FinishStream as i32 != 0);
        assert!(matches!(
            s.push(Bytes::from_static(b"x"), 10),
            Err(SendError::Finished { .. })
        ));
        s.on_ack(4).unwrap();
        assert!(s.is_finished_and_acked());
    }

    /// Never-sent data (the tail) and resends (the range set) come out in
    /// offset order, each once; a restart resends only what went out, and the
    /// tail still follows.
    #[test]
    fn resends_and_the_never_sent_tail_each_go_once() {
        let mut s = stream();
        for _ in 0..4 {
            s.push(Bytes::from(vec![9; 100]), 1 << 20).unwrap();
        }
        let first = s.next_chunk(250).unwrap();
        assert_eq!(first.range.start, 0);
        let cut = first.range.end;
        assert!(cut < 400 && s.has_unsent());
        // The first packet is lost: it goes again before the tail.
        s.requeue(first.range.clone());
        let again = s.next_chunk(10_000).unwrap();
        assert_eq!(again.range, 0..400, "the resend runs on into the tail");
        assert!(!s.has_unsent());
        // The receiver restarted: everything sent goes again, once.
        s.restart();
        s.push(Bytes::from(vec![7; 50]), 1 << 20).unwrap();
        let mut covered = Vec::new();
        while let Some(chunk) = s.next_chunk(10_000) {
            covered.push(chunk.range);
        }
        assert_eq!(covered, vec![0..450]);
        // A requeue never reaches past what was sent.
        s.requeue(0..10_000);
        assert_eq!(s.next_chunk(10_000).map(|c| c.range), Some(0..450));
        assert_eq!(s.on_ack(450), Ok(false));
        assert!(!s.has_unsent() && s.is_drained());
    }

    #[test]
    fn window_blocks_and_reopens() {
        let mut s = SendStream::new(3, 100);
        s.push(Bytes::from(vec![0; 80]), 1000).unwrap();
        assert!(matches!(
            s.push(Bytes::from(vec![0; 30]), 1000),
            Err(SendError::WouldBlock {
                stream_id: 3,
                window: 100
            })
        ));
        s.next_chunk(1000).unwrap();
        assert_eq!(s.on_ack(80), Ok(true));
        s.push(Bytes::from(vec![0; 30]), 1000).unwrap();
    }
}
