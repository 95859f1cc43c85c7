//! `policy import-k8s` in the kernel: each case of the truth table
//! (`zt_agent::policy::import_k8s::truth_table`, the same the unit tests run through the
//! reference and the reference evaluator) imported to zt policy, compiled for the table's
//! cluster and installed in a datapath loaded in-process, with every pod's and the node's
//! address bound to its identity as the agent binds them; then each flow, as its first packet
//! through the XDP program (BPF_PROG_TEST_RUN), must pass or drop as the table says.
//!
//! Needs root (loading BPF programs); fails, never skips, without it.

mod common;

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use zt_agent::{
    datapath::{Datapath, Mode},
    policy::import_k8s::truth_table::Table,
};

use common::scenario::{Case as Packet, FIRST_SOURCE_PORT};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

#[test]
fn the_truth_table_holds_in_the_loaded_program() {
    zt_tests::ensure_root().expect("the import-k8s kernel test loads BPF programs");
    let table = Table::load();
    let mut failures = Vec::new();
    let mut flows = 0;
    for case in &table.cases {
        let (yaml, compiled) = case.import(&table).unwrap_or_else(|err| panic!("{}: {err}", case.name));
        let mut dp = Datapath::load().expect("loading the datapath needs root and a BPF-capable kernel");
        dp.set_mode(Mode::Enforce).unwrap();
        dp.install(&compiled).unwrap();
        for (addr, id) in table.bindings(&compiled) {
            dp.bind_address(addr, id).unwrap();
        }
        let xdp: &mut Xdp = dp.program(zt_common::programs::XDP).unwrap();
        let failures_before = failures.len();
        for (index, flow) in case.flows.iter().enumerate() {
            let (src, dst) = table.ends(flow);
            assert!(flow.port < FIRST_SOURCE_PORT, "{}: {flow}: ports stay below {FIRST_SOURCE_PORT}", case.name);
            // Its own source port: no earlier flow's conntrack entry, either way, can match it.
            let src_port = FIRST_SOURCE_PORT + u16::try_from(index).unwrap();
            let packet = Packet {
                src: src.addr,
                dst: dst.addr,
                protocol: flow.protocol.zt().number(),
                src_port,
                dst_port: flow.port,
                vlan: false,
            };
            let ret = xdp.test_run(TestRunOptions { data_in: Some(&packet.frame()), ..Default::default() }).unwrap();
            let expected = if flow.allowed { XDP_PASS } else { XDP_DROP };
            if ret.return_value != expected {
                failures.push(format!("{}: {flow} ({packet}): XDP returned {}", case.name, ret.return_value));
            }
            flows += 1;
        }
        if failures.len() > failures_before {
            failures.push(format!("--- the policy imported for {} ---\n{yaml}", case.name));
        }
    }
    assert!(failures.is_empty(), "the kernel disagrees with the truth table:\n{}", failures.join("\n"));
    eprintln!("import-k8s: {flows} flows of {} cases as the truth table says", table.cases.len());
}
