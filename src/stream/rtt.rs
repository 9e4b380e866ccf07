//! Round-trip time estimation per path (RFC 6298 smoothing) and the
//! retransmission timeout derived from it.

use std::time::Duration;

/// Smoothed RTT of one path.
#[derive(Clone, Debug)]
pub(crate) struct RttEstimator {
    smoothed: Option<Duration>,
    variance: Duration,
    latest: Duration,
    initial: Duration,
}

impl RttEstimator {
    pub(crate) fn new(initial: Duration) -> Self {
        Self {
            smoothed: None,
            variance: initial / 2,
            latest: initial,
            initial,
        }
    }

    /// Feeds one measured round trip.
    pub(crate) fn update(&mut self, sample: Duration) {
        self.latest = sample;
        match self.smoothed {
            None => {
                self.smoothed = Some(sample);
                self.variance = sample / 2;
            }
            Some(smoothed) => {
                let deviation = smoothed.abs_diff(sample);
                self.variance = (self.variance * 3 + deviation) / 4;
                self.smoothed = Some((smoothed * 7 + sample) / 8);
            }
        }
    }

    /// Smoothed RTT, or the configured initial RTT before any sample.
    pub(crate) fn get(&self) -> Duration {
        self.smoothed.unwrap_or(self.initial)
    }

    /// Whether at least one sample was taken.
    pub(crate) fn has_sample(&self) -> bool {
        self.smoothed.is_some()
    }

    /// Retransmission timeout: 1.25 × smoothed RTT, widened by 4 × the RTT
    /// variance while the path is jittery, within `[min, max]`.
    pub(crate) fn rto(&self, min: Duration, max: Duration) -> Duration {
        let srtt = self.get();
        (srtt + (srtt / 4).max(self.variance * 4)).clamp(min, max)
    }

    /// Time after which a packet below a newer acknowledged one counts as
    /// lost: 9/8 of the larger of the smoothed and latest RTT.
    pub(crate) fn loss_delay(&self) -> Duration {
        self.get().max(self.latest) * 9 / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn converges_to_one_and_a_quarter_rtt() {
        let mut rtt = RttEstimator::new(100 * MS);
        assert_eq!(rtt.get(), 100 * MS);
        for _ in 0..20 {
            rtt.update(40 * MS);
        }
        assert_eq!(rtt.get(), 40 * MS);
        assert_eq!(rtt.rto(MS, 10_000 * MS), 50 * MS);
    }

    #[test]
    fn jitter_widens_rto() {
        let mut rtt = RttEstimator::new(100 * MS);
        for i in 0..50 {
            rtt.update(if i % 2 == 0 { 20 * MS } else { 60 * MS });
        }
        let rto = rtt.rto(MS, 10_000 * MS);
        assert!(rto > rtt.get() * 5 / 4, "rto {rto:?} srtt {:?}", rtt.get());
    }

    #[test]
    fn rto_is_clamped() {
        let rtt = RttEstimator::new(Duration::from_micros(10));
        assert_eq!(rtt.rto(MS, 10 * MS), MS);
    }
}
