//! Scale: 10,000 identities and 100,000 rules compile, load and apply, and a packet still costs
//! the same bounded number of lookups (judged correctly at both ends of the rule table). Needs
//! root; fails, never skips.

use std::fmt::Write as _;

use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use zt_agent::{
    datapath::{Datapath, Mode},
    policy,
};
use zt_common::programs;

const IDENTITIES: usize = 10_000;
const RULES_PER_POLICY: usize = 10;

/// Identity `i` owns 10.(i / 256 + 100).(i % 256).0/24.
fn address(i: usize, host: u8) -> [u8; 4] {
    [10, (i / 256 + 100) as u8, (i % 256) as u8, host]
}

/// Every identity is a subject; identity `i` accepts identity `(i + k) % n` on port 1000 + k for
/// k in 1..=10: 100,000 ingress rules, plus a zero-trust baseline.
fn policy_text() -> String {
    let mut text = String::from(
        "apiVersion: zt/v1\nkind: Policy\nmetadata: {name: baseline}\nspec: {subject: [any], ingress: []}\n",
    );
    for i in 0..IDENTITIES {
        let [a, b, c, _] = address(i, 0);
        write!(text, "---\napiVersion: zt/v1\nkind: Identity\nmetadata: {{name: w{i}}}\nspec: {{selectors: [{{cidr: {a}.{b}.{c}.0/24}}]}}\n").unwrap();
        write!(text, "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: p{i}}}\nspec:\n  subject: [w{i}]\n  ingress:\n").unwrap();
        for k in 1..=RULES_PER_POLICY {
            let peer = (i + k) % IDENTITIES;
            writeln!(text, "    - {{from: [w{peer}], ports: [{{protocol: tcp, port: {}}}]}}", 1000 + k).unwrap();
        }
    }
    text
}

fn xdp_passes(dp: &mut Datapath, src: [u8; 4], dst: [u8; 4], port: u16) -> bool {
    let builder = PacketBuilder::ethernet2([2; 6], [4; 6]).ipv4(src, dst, 64).tcp(40000, port, 1, 1024).syn();
    let mut frame = Vec::new();
    builder.write(&mut frame, &[]).unwrap();
    let xdp: &mut Xdp = dp.program(programs::XDP).unwrap();
    let ret = xdp.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() }).unwrap();
    ret.return_value == 2 // XDP_PASS
}

#[test]
fn ten_thousand_identities_and_a_hundred_thousand_rules_load_and_apply() {
    zt_tests::ensure_root().unwrap();
    let set = policy::parse_str(&policy_text(), "scale.yaml").unwrap_or_else(|e| panic!("{e}"));
    let compiled = policy::compile::compile(&set).unwrap();
    assert_eq!(compiled.identities.len(), IDENTITIES);
    assert_eq!(compiled.rules.len(), IDENTITIES * RULES_PER_POLICY);
    let mut dp = Datapath::load().expect("loading the datapath needs root and a BPF-capable kernel");
    dp.set_mode(Mode::Enforce).unwrap();
    assert_eq!(dp.install(&compiled).unwrap(), 1);
    // The first and the last identity, each with its first and last rule, and misses around them.
    for i in [0, IDENTITIES - 1] {
        let dst = address(i, 2);
        for k in [1, RULES_PER_POLICY] {
            let peer = (i + k) % IDENTITIES;
            assert!(xdp_passes(&mut dp, address(peer, 2), dst, 1000 + k as u16), "w{peer} → w{i}:{}", 1000 + k);
            assert!(!xdp_passes(&mut dp, address(peer, 3), dst, 1001 + k as u16), "w{peer} → w{i}: other port");
        }
        let stranger = address((i + RULES_PER_POLICY + 1) % IDENTITIES, 2);
        assert!(!xdp_passes(&mut dp, stranger, dst, 1001), "an identity with no rule for w{i}");
    }
    // Written in batches, every entry is in place.
    let in_force = |dp: &Datapath| dp.slot_entries().unwrap()[dp.config().unwrap().slot as usize];
    let (addresses, policy, isolation) = in_force(&dp);
    assert_eq!((addresses, policy, isolation), (compiled.ipcache.len(), compiled.policy.len(), compiled.isolation.len()));
    // A second generation of the same size applies too (the inactive slot holds it), and the
    // first one's entries are all removed.
    assert_eq!(dp.install(&compiled).unwrap(), 2);
    assert!(xdp_passes(&mut dp, address(1, 4), address(0, 2), 1001));
    let other = 1 - dp.config().unwrap().slot as usize;
    assert_eq!(dp.slot_entries().unwrap()[other], (0, 0, 0), "the first generation's entries are gone");
    assert_eq!(in_force(&dp), (addresses, policy, isolation));
}
