//! The kernel's counters (`ZT_COUNTERS`, laid out by `zt_common::counters`), summed over CPUs:
//! one snapshot type read by `status` and by the metrics endpoint alike.

use std::borrow::Borrow;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray};
use serde::{Deserialize, Serialize};
use zt_common::{counters, is_reported, Direction, Hook, Reason, Verdict};

/// Reads `ZT_COUNTERS` and sums each counter over the CPUs.
pub fn read<T: Borrow<MapData>>(map: &PerCpuArray<T, u64>) -> Result<Counters> {
    let values = (0..counters::COUNT)
        .map(|i| Ok(map.get(&i, 0).with_context(|| format!("reading counter {i}"))?.iter().sum()))
        .collect::<Result<_>>()?;
    Ok(Counters::from_summed(values))
}

/// Packets by (verdict, reason, direction, hook) and flow-event outcomes, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    values: Vec<u64>,
}

/// One packet counter with its labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketCount {
    pub verdict: Verdict,
    pub reason: Reason,
    pub direction: Direction,
    pub hook: Hook,
    pub packets: u64,
}

/// What became of the flow events the kernel had to report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCounts {
    /// Queued on the ring buffer for the agent.
    pub emitted: u64,
    /// Held back by the per-flow window or the rate limit.
    pub suppressed: u64,
    /// Dropped because the ring buffer was full.
    pub lost: u64,
}

impl Counters {
    /// From the array's values, already summed over CPUs, in `zt_common::counters` order.
    pub fn from_summed(values: Vec<u64>) -> Self {
        assert_eq!(values.len(), counters::COUNT as usize, "ZT_COUNTERS has zt_common::counters::COUNT entries");
        Self { values }
    }

    fn at(&self, index: u32) -> u64 {
        self.values[index as usize]
    }

    pub fn packets(&self, verdict: Verdict, reason: Reason, direction: Direction, hook: Hook) -> u64 {
        self.at(counters::packet_index(verdict, reason, direction, hook))
    }

    /// Packets counted under (verdict, reason), whatever the direction and hook.
    pub fn by_verdict_reason(&self, verdict: Verdict, reason: Reason) -> u64 {
        self.all().filter(|c| c.verdict == verdict && c.reason == reason).map(|c| c.packets).sum()
    }

    /// Every packet counter, zero or not, in index order.
    pub fn all(&self) -> impl Iterator<Item = PacketCount> + '_ {
        Verdict::ALL.into_iter().flat_map(move |verdict| {
            Reason::ALL.into_iter().flat_map(move |reason| {
                Direction::ALL.into_iter().flat_map(move |direction| {
                    Hook::ALL.into_iter().map(move |hook| PacketCount {
                        verdict,
                        reason,
                        direction,
                        hook,
                        packets: self.packets(verdict, reason, direction, hook),
                    })
                })
            })
        })
    }

    /// The packet counters that counted something.
    pub fn nonzero(&self) -> impl Iterator<Item = PacketCount> + '_ {
        self.all().filter(|c| c.packets > 0)
    }

    /// Packets whose verdict is reported as a flow event (`zt_common::is_reported`): each one was
    /// emitted, suppressed or lost, so this equals the sum of [`events`](Self::events).
    pub fn reported_packets(&self) -> u64 {
        self.all().filter(|c| is_reported(c.verdict, c.reason)).map(|c| c.packets).sum()
    }

    pub fn events(&self) -> EventCounts {
        EventCounts {
            emitted: self.at(counters::EVENTS_EMITTED),
            suppressed: self.at(counters::EVENTS_SUPPRESSED),
            lost: self.at(counters::EVENTS_LOST),
        }
    }

    /// What was counted since `earlier`, counter by counter.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters { values: self.values.iter().zip(&earlier.values).map(|(now, then)| now.wrapping_sub(*then)).collect() }
    }
}

impl EventCounts {
    pub fn total(&self) -> u64 {
        self.emitted + self.suppressed + self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(entries: &[(u32, u64)]) -> Counters {
        let mut values = vec![0; counters::COUNT as usize];
        for (index, n) in entries {
            values[*index as usize] = *n;
        }
        Counters::from_summed(values)
    }

    #[test]
    fn every_dimension_has_its_own_counter() {
        let mut seen = std::collections::HashSet::new();
        for c in with(&[]).all() {
            assert!(seen.insert(counters::packet_index(c.verdict, c.reason, c.direction, c.hook)));
        }
        assert_eq!(seen.len(), counters::PACKET_COUNT as usize);
        assert!(seen.iter().all(|&i| i < counters::PACKET_COUNT), "packet counters come before the event counters");
    }

    #[test]
    fn sums_follow_the_labels() {
        let deny_tc = counters::packet_index(Verdict::Deny, Reason::DefaultDeny, Direction::Egress, Hook::TcIngress);
        let deny_xdp = counters::packet_index(Verdict::Deny, Reason::DefaultDeny, Direction::Ingress, Hook::Xdp);
        let established = counters::packet_index(Verdict::Allow, Reason::Established, Direction::None, Hook::TcEgress);
        let c = with(&[(deny_tc, 3), (deny_xdp, 4), (established, 10), (counters::EVENTS_EMITTED, 5), (counters::EVENTS_SUPPRESSED, 2)]);
        assert_eq!(c.by_verdict_reason(Verdict::Deny, Reason::DefaultDeny), 7);
        assert_eq!(c.packets(Verdict::Deny, Reason::DefaultDeny, Direction::Ingress, Hook::Xdp), 4);
        assert_eq!(c.nonzero().count(), 3);
        assert_eq!(c.reported_packets(), 7, "established packets raise no event");
        assert_eq!(c.events(), EventCounts { emitted: 5, suppressed: 2, lost: 0 });
        assert_eq!(c.since(&with(&[(deny_tc, 1)])).packets(Verdict::Deny, Reason::DefaultDeny, Direction::Egress, Hook::TcIngress), 2);
    }
}
