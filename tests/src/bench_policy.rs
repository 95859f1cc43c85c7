//! The policies the benchmarks load: `identities` identities of one IPv4 and one IPv6 address
//! each, and `rules` rules between them, any size, always the same for the same sizes.

use std::{fmt::Write as _, net::IpAddr};

/// Identity `w<i>`'s address: 10.x.y.z, or fd00::x:y.
pub fn address(i: usize, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::from([0xfd00, 0, 0, 0, 0, 0, (i >> 16) as u16, i as u16])
    } else {
        IpAddr::from([10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8])
    }
}

/// Rule `k` of a policy over `identities` identities: (peer, subject, port) — the peer w<peer>
/// may reach the subject w<subject> on `port`. Rule 0: w1 → w0:1024, rule 1: w2 → w1:1024.
pub fn rule(k: usize, identities: usize) -> (usize, usize, u16) {
    let (subject, round) = (k % identities, k / identities);
    let peer = (k + 1 + round) % identities;
    let peer = if peer == subject { (peer + 1) % identities } else { peer };
    (peer, subject, 1024 + (round % 60_000) as u16)
}

/// Identities `w<i>`; rule k lets w<(k + 1 + k / n) % n> reach w<k % n> on TCP port
/// 1024 + k / n, one policy per subject. Rule 0: w1 → w0:1024.
pub fn policy_text(rules: usize, identities: usize) -> String {
    policy_text_for(rules, identities, "tcp")
}

/// [`policy_text`] with the rules on `protocol` ("tcp" or "udp").
pub fn policy_text_for(rules: usize, identities: usize, protocol: &str) -> String {
    let mut text = String::new();
    for i in 0..identities {
        let (v4, v6) = (address(i, false), address(i, true));
        writeln!(text, "---\napiVersion: zt/v1\nkind: Identity\nmetadata: {{name: w{i}}}\nspec: {{selectors: [{{cidr: {v4}/32}}, {{cidr: \"{v6}/128\"}}]}}").unwrap();
    }
    let mut by_subject: Vec<Vec<(usize, u16)>> = vec![Vec::new(); identities];
    for k in 0..rules {
        let (peer, subject, port) = rule(k, identities);
        by_subject[subject].push((peer, port));
    }
    for (subject, rules) in by_subject.iter().enumerate().filter(|(_, rules)| !rules.is_empty()) {
        writeln!(text, "---\napiVersion: zt/v1\nkind: Policy\nmetadata: {{name: p{subject}}}\nspec:\n  subject: [w{subject}]\n  ingress:").unwrap();
        for (peer, port) in rules {
            writeln!(text, "    - {{from: [w{peer}], ports: [{{protocol: {protocol}, port: {port}}}]}}").unwrap();
        }
    }
    text
}
