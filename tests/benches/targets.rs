//! `cargo xtask bench`, last: issue #12's targets against the figures the other benches wrote
//! to today's bench/results/<date>.json, each met or missed, and for a missed one what this run
//! measured of what limits it. Appends to the day's .md and adds `targets` to the .json.

use std::{fmt::Write as _, fs, path::PathBuf};

use serde_json::{json, Value};

fn rows<'a>(results: &'a Value, section: &[&str]) -> impl Iterator<Item = &'a Value> {
    let list = section.iter().fold(results, |value, key| &value[*key]);
    list.as_array().map(|list| list.iter()).into_iter().flatten()
}

fn number(row: &Value, key: &str) -> f64 {
    row[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {row}"))
}

/// (lowest, highest) of `values`.
fn range(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.into_iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    assert!(lo <= hi, "no figures for a target: did every bench run?");
    (lo, hi)
}

/// The per-packet rows' ratios to the lookup reference for `measure`, where `pick` holds.
fn per_packet(results: &Value, measure: &str, pick: impl Fn(&Value) -> bool) -> Vec<f64> {
    rows(results, &["rows"]).filter(|r| r["measure"] == measure && pick(r)).map(|r| number(r, "vs_lookup")).collect()
}

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The largest spread of one measure over a sweep, over every hook and family: zt's time as a
/// ratio to the run's lookup reference, the median of every case's (the reference looks up an
/// empty table, whatever the case: how it moves between cases is the machine's noise).
fn spread(results: &Value, measures: &[&str], sweep: impl Fn(&Value) -> bool) -> f64 {
    let mut worst: f64 = 0.0;
    for &measure in measures {
        let of_measure = || rows(results, &["rows"]).filter(move |r| r["measure"] == measure);
        let reference = median(of_measure().map(|r| number(r, "lookup_ns")).collect());
        for hook in ["xdp", "tc"] {
            for family in ["IPv4", "IPv6"] {
                let ratios =
                    of_measure().filter(|r| r["hook"] == hook && r["family"] == family && sweep(r)).map(|r| number(r, "ns") / reference);
                let (lo, hi) = range(ratios);
                worst = worst.max(hi / lo - 1.0);
            }
        }
    }
    worst * 100.0
}

/// (lowest, highest) change of every measure, hook and family from case `from` to case `to`
/// (rules, identities), in percent.
fn change(results: &Value, from: (u64, u64), to: (u64, u64)) -> (f64, f64) {
    let ns = |row: &Value, case: (u64, u64)| {
        rows(results, &["rows"])
            .find(|r| {
                r["measure"] == row["measure"] && r["hook"] == row["hook"] && r["family"] == row["family"] && r["rules"] == case.0 && r["identities"] == case.1
            })
            .map(|r| number(r, "ns"))
            .expect("every case measured")
    };
    let starts = rows(results, &["rows"]).filter(|r| r["rules"] == from.0 && r["identities"] == from.1);
    range(starts.map(|r| (ns(r, to) / ns(r, from) - 1.0) * 100.0))
}

fn wire(results: &Value, filters: &[&str], key: &str, rules: Option<u64>) -> (f64, f64) {
    let matching = rows(results, &["wire", "rows"])
        .filter(|r| filters.iter().any(|f| r["filter"] == *f) && rules.is_none_or(|n| r["rules"] == n));
    range(matching.map(|r| number(r, key)))
}

struct Target {
    measure: &'static str,
    target: &'static str,
    measured: String,
    met: bool,
    limit: String,
}

fn main() {
    let date = String::from_utf8(std::process::Command::new("date").arg("+%F").output().unwrap().stdout).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    let json_path = dir.join(format!("{}.json", date.trim()));
    let mut results: Value = serde_json::from_str(&fs::read_to_string(&json_path).expect("the datapath bench wrote today's results")).unwrap();
    let zt = ["zt, XDP", "zt, TC"];
    let ratio = |(lo, hi): (f64, f64)| format!("{lo:.2}–{hi:.2}×");
    let mut targets = Vec::new();

    // Per packet, against the parse + one lookup reference.
    let established = range(per_packet(&results, "established", |_| true));
    let ns_over: Vec<f64> = rows(&results, &["rows"]).filter(|r| r["measure"] == "established").map(|r| number(r, "ns") - number(r, "lookup_ns")).collect();
    let (over_lo, over_hi) = range(ns_over);
    targets.push(Target {
        measure: "established flow × lookup reference",
        target: "≤ 1.5×",
        measured: ratio(established),
        met: established.1 <= 1.5,
        limit: format!("{over_lo:.0}–{over_hi:.0} ns a packet above the reference's parse and lookup: the config word, the clock, the conntrack entry's checks and refresh, and a counter"),
    });
    let new_flows = range(per_packet(&results, "new allowed", |_| true).into_iter().chain(per_packet(&results, "new denied", |_| true)));
    // The parts of a new allowed flow at 1k rules and 1k identities, XDP, IPv4.
    let part = rows(&results, &["rows"])
        .find(|r| r["measure"] == "new allowed" && r["hook"] == "xdp" && r["family"] == "IPv4" && r["rules"] == 1000 && r["identities"] == 1000)
        .expect("the 1k/1k case");
    let lookup = number(part, "lookup_ns");
    let admitting = (number(part, "admit_reference_ns") - lookup) / lookup;
    let reporting = (number(part, "report_reference_ns") - lookup) / lookup;
    targets.push(Target {
        measure: "new flow, allowed or denied × lookup reference",
        target: "≤ 3×",
        measured: ratio(new_flows),
        met: new_flows.1 <= 3.0,
        limit: format!(
            "XDP IPv4, 1k rules: a new allowed flow is {:.2}×; above the reference's parse and lookup, admitting it (its conntrack insert) is {admitting:.2}×, reporting it (event window, ring buffer) {reporting:.2}×, the decision and the rest {:.2}×",
            number(part, "vs_lookup"),
            number(part, "vs_lookup") - 1.0 - admitting - reporting
        ),
    });
    const ALL: [&str; 3] = ["established", "new allowed", "new denied"];
    let by_rules = spread(&results, &ALL, |r| r["identities"] == 1000);
    let by_identities = spread(&results, &ALL, |r| r["rules"] == 1000);
    // Established packets look no policy up: how they spread over the same sweeps is the run's noise.
    let noise = spread(&results, &["established"], |r| r["identities"] == 1000).max(spread(&results, &["established"], |r| r["rules"] == 1000));
    targets.push(Target {
        measure: "spread, 10 → 100k rules and 10 → 50k identities",
        target: "within ±10 %",
        measured: format!("+{by_rules:.0} % over rules, +{by_identities:.0} % over identities (worst hook, family and measure)"),
        met: by_rules.max(by_identities) <= 10.0,
        limit: {
            let (rules_lo, rules_hi) = change(&results, (10, 1000), (100_000, 1000));
            let (ids_lo, ids_hi) = change(&results, (1000, 10), (1000, 50_000));
            format!(
                "the lookups are exact-match hashes: from one end of a sweep to the other every measure moves {rules_lo:+.0} to {rules_hi:+.0} % (10 → 100k rules) and {ids_lo:+.0} to {ids_hi:+.0} % (10 → 50k identities; at 10 identities 1k rules crowd each pair's ports into split blocks, a lookup more); established packets, which look no policy up, spread up to {noise:.0} % over the same sweeps: the machine's noise"
            )
        },
    });

    // End to end.
    let udp = wire(&results, &zt, "udp_vs_none", None);
    let tcp = wire(&results, &["zt, TC"], "tcp_vs_none", None);
    let floor = wire(&results, &["XDP floor"], "udp_vs_none", None);
    let nftables = wire(&results, &["nftables"], "udp_vs_none", None);
    targets.push(Target {
        measure: "end to end × no filtering",
        target: "≥ 95 %",
        measured: format!("UDP {}, TCP through TC {}", ratio(udp), ratio(tcp)),
        met: udp.0 >= 0.95 && tcp.0 >= 0.95,
        limit: format!(
            "an XDP program that does nothing passes {} on this veth (its XDP path; a veth's peer also loses segmentation offload); nftables passes {}",
            ratio(floor),
            ratio(nftables)
        ),
    });
    let vs_nft = wire(&results, &zt, "udp_vs_nftables", None);
    let tcp_vs_nft = wire(&results, &["zt, TC"], "tcp_vs_nftables", None);
    targets.push(Target {
        measure: "end to end × nftables with sets",
        target: "≥ 1×",
        measured: format!("UDP {}, TCP through TC {}", ratio(vs_nft), ratio(tcp_vs_nft)),
        met: vs_nft.0 >= 1.0 && tcp_vs_nft.0 >= 1.0,
        limit: "on XDP, the cost of any XDP program on a veth (above); through TC, a new flow's decision and its conntrack insert".into(),
    });
    let vs_iptables = wire(&results, &zt, "udp_vs_iptables", Some(10_000));
    targets.push(Target {
        measure: "end to end × iptables linear, 10k rules",
        target: "≥ 10×",
        measured: format!("UDP {}", ratio(vs_iptables)),
        met: vs_iptables.0 >= 10.0,
        limit: "—".into(),
    });
    let raw: Vec<&Value> = rows(&results, &["wire", "drops"]).filter(|r| r["mechanism"] == "iptables raw").collect();
    let drop = range(raw.iter().map(|r| number(r, "zt_vs_this")));
    let worst = raw.iter().min_by(|a, b| number(a, "zt_vs_this").total_cmp(&number(b, "zt_vs_this"))).unwrap();
    targets.push(Target {
        measure: "denied flood drop rate × iptables raw",
        target: "≥ 3×",
        measured: format!("{} (10–10k rules)", ratio(drop)),
        met: drop.0 >= 3.0,
        limit: format!("lowest at {} rules, where iptables' raw table has as few rules to walk; zt's drop rate is flat over the rules", worst["rules"]),
    });

    // The agent.
    let at_100k = rows(&results, &["agent", "sizes"]).find(|r| r["rules"] == 100_000).expect("the 100k-rule apply");
    let baseline = &results["agent"]["baseline"];
    let (apply, peak_mb) = (number(at_100k, "apply_seconds"), number(at_100k, "peak_mib") * 1.048_576);
    let phase = |name: &str| number(&at_100k["phases_ms"], name) / 1e3;
    targets.push(Target {
        measure: "apply 100k rules",
        target: "≤ 1 s",
        measured: format!("{apply:.2} s"),
        met: apply <= 1.0,
        limit: format!(
            "of it, the agent's reload took {:.2} s reading and parsing the YAML, {:.2} s compiling, {:.2} s staging the entries and {:.2} s switching; the rest is the 0.15 s debounce and the file events",
            phase("load"),
            phase("compile"),
            phase("stage"),
            phase("switch")
        ),
    });
    let mb = |row: &Value, key: &str| number(row, key) * 1.048_576;
    targets.push(Target {
        measure: "agent peak memory at 100k rules",
        target: "≤ 50 MB",
        measured: format!("{peak_mb:.0} MB"),
        met: peak_mb <= 50.0,
        limit: format!(
            "the agent at 10 rules peaks at {:.0} MB, with {:.0} MB of its binary, {:.0} MB of mapped BPF maps (the event ring buffer) and {:.0} MB of heap resident (aya's loader parses the kernel's BTF, 5 MB, into about 19 MB of heap, freed after the load); the 100k rules' parse and compile add {:.0} MB at the peak",
            mb(baseline, "peak_mib"),
            mb(baseline, "binary_mib"),
            mb(baseline, "bpf_maps_mib"),
            mb(baseline, "anonymous_mib"),
            peak_mb - mb(baseline, "peak_mib")
        ),
    });

    let mut md = String::new();
    writeln!(md, "\n## Targets (issue #12)\n").unwrap();
    writeln!(md, "Each against this run's figures above; for a missed one, what this run measured of what limits it.\n").unwrap();
    writeln!(md, "| measure | target | measured | | what limits it |\n|---|---|---|---|---|").unwrap();
    for t in &targets {
        writeln!(md, "| {} | {} | {} | {} | {} |", t.measure, t.target, t.measured, if t.met { "met" } else { "missed" }, t.limit).unwrap();
    }
    print!("{md}");
    let md_path = dir.join(format!("{}.md", date.trim()));
    let mut text = fs::read_to_string(&md_path).expect("the datapath bench wrote today's results");
    text.push_str(&md);
    fs::write(&md_path, text).unwrap();
    results["targets"] = targets
        .iter()
        .map(|t| json!({"measure": t.measure, "target": t.target, "measured": t.measured, "met": t.met, "limit": t.limit}))
        .collect();
    fs::write(&json_path, serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    eprintln!("bench: appended the targets to {}", md_path.display());
}
