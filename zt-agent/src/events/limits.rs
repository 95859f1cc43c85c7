//! How many flow events the kernel may raise: the `zt-agent run` options (`--event-window`,
//! `--event-rate`, `--event-burst`) and their kernel form, `zt_common::EventLimits`.
//!
//! A flood of denied packets must not turn into a flood of events that starves the agent (and
//! the sinks behind it). The kernel first holds back repeats of a flow within the window, then
//! spends a token bucket; whatever it holds back is counted, and a flow's next event says how
//! many of its own were held back.

use std::{str::FromStr, time::Duration};

use anyhow::{bail, Context as _, Result};
use zt_common::EventLimits;

/// The limits as an operator states them: node-wide, per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLimitSettings {
    /// After a flow's event, its further events within this window are suppressed; zero: none.
    pub window: Duration,
    /// Sustained events per second, node-wide; 0: unlimited.
    pub rate: u64,
    /// Events that may come back to back before the rate applies, node-wide.
    pub burst: u64,
}

impl EventLimitSettings {
    /// No window, no rate: every event is emitted (as long as the ring buffer has room).
    pub const UNLIMITED: Self = Self { window: Duration::ZERO, rate: 0, burst: 0 };

    /// The kernel's per-CPU form: each CPU has its own bucket (lock-free), so the rate and the
    /// burst are split evenly over `cpus` (rounded so that no CPU gets less than its share, and
    /// every CPU at least one event of burst).
    pub fn per_cpu(&self, cpus: u32) -> EventLimits {
        let cpus = u64::from(cpus.max(1));
        let window_ns = u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX);
        match self.rate {
            0 => EventLimits { window_ns, interval_ns: 0, burst: 0 },
            rate => EventLimits {
                window_ns,
                // At least 1 ns: 0 would mean "no limit".
                interval_ns: (1_000_000_000 * cpus / rate).max(1),
                burst: self.burst.div_ceil(cpus).max(1),
            },
        }
    }
}

/// Parses `--event-rate` into events per second: `N/s`, `N/m` or a bare `N` (per second); `0`
/// means unlimited. A rate per minute below one per second is rounded up to one per second.
pub fn parse_rate(text: &str) -> Result<u64> {
    let (number, per_seconds) = match text.trim().split_once('/') {
        None => (text.trim(), 1),
        Some((number, "s")) => (number, 1),
        Some((number, "m")) => (number, 60),
        Some((_, unit)) => bail!("unknown unit /{unit} in event rate {text:?}; write e.g. 5000/s or 600/m"),
    };
    let count = u64::from_str(number.trim())
        .with_context(|| format!("event rate {text:?} is not a number of events; write e.g. 5000/s, or 0 for no limit"))?;
    Ok(match count {
        0 => 0,
        _ => (count / per_seconds).max(1),
    })
}

/// Parses `--event-window`: a duration such as `1s`, `500ms`, or `0` for no window.
pub fn parse_window(text: &str) -> Result<Duration> {
    humantime::parse_duration(text.trim())
        .with_context(|| format!("event window {text:?} is not a duration; write e.g. 1s, 500ms, or 0 for none"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_per_second_and_per_minute() {
        assert_eq!(parse_rate("5000/s").unwrap(), 5000);
        assert_eq!(parse_rate("5000").unwrap(), 5000);
        assert_eq!(parse_rate("600/m").unwrap(), 10);
        assert_eq!(parse_rate("1/m").unwrap(), 1, "never rounded down to unlimited");
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10/h").unwrap_err().to_string().contains("/h"));
    }

    #[test]
    fn windows_parse_as_durations() {
        assert_eq!(parse_window("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_window("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_window("0").unwrap(), Duration::ZERO);
        assert!(parse_window("soon").is_err());
    }

    #[test]
    fn rate_and_burst_are_split_over_the_cpus() {
        let settings = EventLimitSettings { window: Duration::from_secs(1), rate: 5000, burst: 10_001 };
        let limits = settings.per_cpu(2);
        assert_eq!(limits.window_ns, 1_000_000_000);
        assert_eq!(limits.interval_ns, 400_000, "2500 events per second on each of 2 CPUs");
        assert_eq!(limits.burst, 5001);
        assert_eq!(EventLimitSettings::UNLIMITED.per_cpu(8), EventLimits::default(), "all zeros: no limit");
        let fast = EventLimitSettings { rate: u64::MAX / 1_000_000_000, burst: 0, ..settings };
        let limits = fast.per_cpu(1);
        assert!(limits.interval_ns >= 1 && limits.burst == 1, "a huge rate is still a rate: {limits:?}");
    }
}
