//! What `cargo xtask bench` measures zt against must stay what it says it is, though the bench
//! itself never runs in the test suite: the reference programs load (the verifier accepts
//! them), the floor passes everything, the lookup reference parses zt's way and looks the flow
//! up (a flow it does not hold is dropped, a frame zt cannot parse too), the admit reference
//! holds a flow's conntrack entry, the report reference a window entry and an event, and
//! the bench's policy has the rules it is named for. Needs root; fails, never skips.

use aya::{
    maps::{HashMap, RingBuf},
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use zt_agent::{datapath, policy, policy::compile::ip_key};
use zt_common::{programs, proto, CtKey, CtValue, EventFlowKey, EventFlowState, FlowEvent};
use zt_tests::{bench_policy::policy_text, ensure_root};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn syn() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4([10, 1, 0, 1], [10, 1, 0, 0], 64).tcp(40_000, 1024, 1, 64_240).syn();
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).unwrap();
    frame
}

#[test]
fn the_reference_programs_load_and_do_what_the_bench_says() {
    ensure_root().unwrap();
    let mut references = datapath::reference_programs().expect("the reference object loads");
    let verdict = |references: &mut aya::Ebpf, name: &str, frame: &[u8]| {
        let program: &mut Xdp = references.program_mut(name).unwrap().try_into().unwrap();
        program.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() }).unwrap().return_value
    };
    let (frame, garbage) = (syn(), vec![0xffu8; 60]);
    assert_eq!(verdict(&mut references, programs::REFERENCE_FLOOR, &frame), XDP_PASS);
    assert_eq!(verdict(&mut references, programs::REFERENCE_FLOOR, &garbage), XDP_PASS, "the floor looks at nothing");
    assert_eq!(verdict(&mut references, programs::REFERENCE_LOOKUP, &frame), XDP_DROP, "parsed, looked up, not found");
    assert_eq!(verdict(&mut references, programs::REFERENCE_LOOKUP, &garbage), XDP_DROP, "not parsed");
    // Held, the same frame is found: the lookup keys the flow as conntrack does.
    let key = CtKey {
        src: ip_key("10.1.0.1".parse().unwrap()),
        dst: ip_key("10.1.0.0".parse().unwrap()),
        src_port: 40_000,
        dst_port: 1024,
        protocol: proto::TCP,
        _pad: [0; 3],
    };
    let mut flows: HashMap<_, CtKey, CtValue> = HashMap::try_from(references.map_mut("REFERENCE_FLOWS").unwrap()).unwrap();
    flows.insert(key, CtValue::default(), 0).unwrap();
    assert_eq!(verdict(&mut references, programs::REFERENCE_LOOKUP, &frame), XDP_PASS, "parsed, looked up, found");

    // Admitting: the flow is held, in one entry, as conntrack holds it.
    assert_eq!(verdict(&mut references, programs::REFERENCE_ADMIT, &frame), XDP_PASS);
    let admitted: HashMap<_, CtKey, CtValue> = HashMap::try_from(references.map("REFERENCE_ADMITTED").unwrap()).unwrap();
    let held: Vec<CtKey> = admitted.keys().map(Result::unwrap).collect();
    assert_eq!(held, [key]);
    // Reporting: the flow is in the window, and one event with its addresses is queued.
    assert_eq!(verdict(&mut references, programs::REFERENCE_REPORT, &frame), XDP_DROP);
    let window: HashMap<_, EventFlowKey, EventFlowState> = HashMap::try_from(references.map("REFERENCE_WINDOW").unwrap()).unwrap();
    assert_eq!(window.keys().count(), 1);
    let mut ring = RingBuf::try_from(references.map_mut("REFERENCE_EVENTS").unwrap()).unwrap();
    let event: FlowEvent = unsafe { std::ptr::read_unaligned(ring.next().expect("one event").as_ptr().cast()) };
    assert_eq!((event.src_addr, event.dst_addr), (key.src, key.dst));
    assert!(ring.next().is_none());
}

#[test]
fn the_bench_policy_has_the_rules_and_identities_it_is_named_for() {
    for (rules, identities) in [(10, 1_000), (1_000, 10), (5_000, 700)] {
        let set = policy::parse_str(&policy_text(rules, identities), "bench.yaml").unwrap();
        let compiled = policy::compile::compile(&set).unwrap();
        assert_eq!((compiled.rules.len(), compiled.identities.len()), (rules, identities));
    }
}
