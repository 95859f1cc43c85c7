//! Workloads identified by the X.509 SVID they present: real certificates (made here with
//! rcgen), a real agent verifying them, real packets. Needs root; fails, never skips.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::Value;
use tempfile::TempDir;
use time::OffsetDateTime;
use zt_tests::{ensure_root, tcp_connect, tcp_server, Agent, AgentOptions, Server, Topology, TopologySpec};

const WEB_ID: &str = "spiffe://zt.test/ns/shop/sa/web";
const WAIT: Duration = Duration::from_secs(2);
const BLOCKED: Duration = Duration::from_millis(700);
const EVENT_WAIT: Duration = Duration::from_secs(5);

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { pem, issuer: Issuer::new(params, key) }
}

/// An SVID valid from `not_before` to `not_after` (relative to now), with `uri` as its SAN.
fn svid(ca: &Ca, uri: Option<&str>, not_before: time::Duration, not_after: time::Duration) -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "web");
    params.subject_alt_names = uri.map(|u| SanType::URI(Ia5String::try_from(u).unwrap())).into_iter().collect();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = OffsetDateTime::now_utc() + not_before;
    params.not_after = OffsetDateTime::now_utc() + not_after;
    params.signed_by(&KeyPair::generate().unwrap(), &ca.issuer).unwrap().pem()
}

fn valid(ca: &Ca) -> String {
    svid(ca, Some(WEB_ID), time::Duration::minutes(-5), time::Duration::hours(1))
}

/// The agent's SVID directory and trust bundle, with web's presentation bound to its addresses.
struct Presented {
    dir: TempDir,
    bundle: PathBuf,
}

impl Presented {
    fn new(t: &Topology, ca: &Ca) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.pem");
        fs::write(&bundle, &ca.pem).unwrap();
        let web = dir.path().join("svids/web");
        fs::create_dir_all(&web).unwrap();
        let bind = format!("addresses: [\"{}\", \"{}\"]\n", t.ipv4("web"), t.ipv6("web"));
        fs::write(web.join("bind.yaml"), bind).unwrap();
        Self { dir, bundle }
    }

    fn svids(&self) -> PathBuf {
        self.dir.path().join("svids")
    }

    /// Replaces web's certificate the way a rotation tool must: write aside, rename over.
    fn present(&self, pem: &str) {
        let web = self.svids().join("web");
        fs::write(web.join("svid.pem.new"), pem).unwrap();
        fs::rename(web.join("svid.pem.new"), web.join("svid.pem")).unwrap();
    }
}

fn start(t: &Topology, presented: &Presented) -> Agent {
    let mut options = AgentOptions::for_node(t.node(), fixture(), "enforce");
    options.extra_args = vec![
        "--svid-dir".into(),
        presented.svids().display().to_string(),
        "--trust-bundle".into(),
        presented.bundle.display().to_string(),
    ];
    Agent::start(t.node().ns(), &options).unwrap()
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/certificates.yaml")
}

fn setup() -> (Topology, Vec<Server>) {
    ensure_root().unwrap();
    let t = Topology::new(TopologySpec::new().workload("web", 1).workload("api", 2)).unwrap();
    let servers = [t.ipv4("api"), t.ipv6("api")]
        .map(|ip| tcp_server(t.ns("api"), SocketAddr::new(ip, 8080)).unwrap())
        .into();
    (t, servers)
}

fn web_to_api(t: &Topology, timeout: Duration) -> bool {
    [t.ipv4("api"), t.ipv6("api")]
        .into_iter()
        .all(|ip| tcp_connect(t.ns("web"), SocketAddr::new(ip, 8080), timeout).is_ok())
}

fn web_blocked(t: &Topology) -> bool {
    [t.ipv4("api"), t.ipv6("api")]
        .into_iter()
        .all(|ip| tcp_connect(t.ns("web"), SocketAddr::new(ip, 8080), BLOCKED).is_err())
}

fn identity_event(agent: &Agent, result: &str, reason: &str) -> Value {
    let matches = |e: &Value| e["kind"] == "identity" && e["result"] == result && e["reason"] == reason;
    agent.wait_for_event(matches, EVENT_WAIT).unwrap_or_else(|| {
        panic!("no identity event {result}/{reason}\nevents: {:#?}\nagent log:\n{}", agent.events(), agent.stderr())
    })
}

fn count(agent: &Agent, result: &str, reason: &str) -> usize {
    agent.events().iter().filter(|e| e["kind"] == "identity" && e["result"] == result && e["reason"] == reason).count()
}

#[test]
fn a_verified_svid_identifies_its_workload() {
    let (t, _servers) = setup();
    let ca = new_ca("zt test CA");
    let presented = Presented::new(&t, &ca);
    presented.present(&valid(&ca));
    let agent = start(&t, &presented);
    let bound = identity_event(&agent, "bound", "verified");
    assert_eq!(bound["spiffe_id"], WEB_ID);
    assert!(web_to_api(&t, WAIT), "web presents a valid SVID\n{}", agent.stderr());
    let allow = agent
        .wait_for_event(|e| e["verdict"] == "allow" && e["src"]["identity"] == WEB_ID, EVENT_WAIT)
        .unwrap_or_else(|| panic!("no allow event: {:#?}", agent.events()));
    assert_eq!(allow["src"]["source"], "certificate", "{allow:#}");
    assert_eq!(allow["dst"]["identity"], "api", "{allow:#}");
}

#[test]
fn expired_untrusted_and_san_less_certificates_identify_nobody() {
    let (t, _servers) = setup();
    let ca = new_ca("zt test CA");
    let presented = Presented::new(&t, &ca);
    presented.present(&svid(&ca, Some(WEB_ID), time::Duration::days(-2), time::Duration::days(-1)));
    let agent = start(&t, &presented);

    identity_event(&agent, "rejected", "expired");
    assert!(web_blocked(&t), "expired SVID: web stays unidentified, so default-deny");

    presented.present(&valid(&new_ca("an impostor CA")));
    identity_event(&agent, "rejected", "untrusted");
    assert!(web_blocked(&t), "SVID from a CA outside the trust bundle");

    presented.present(&svid(&ca, None, time::Duration::minutes(-5), time::Duration::hours(1)));
    identity_event(&agent, "rejected", "no-spiffe-id");
    assert!(web_blocked(&t), "certificate without a SPIFFE ID");

    presented.present("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n");
    identity_event(&agent, "rejected", "malformed");
    assert!(web_blocked(&t), "malformed PEM");

    // The same workload, once it presents a valid SVID, is let through: the denials above were
    // about the certificates, not about the workload or the path.
    presented.present(&valid(&ca));
    identity_event(&agent, "bound", "verified");
    assert!(web_to_api(&t, WAIT), "valid SVID after the bad ones\n{}", agent.stderr());
    let deny = agent
        .wait_for_event(|e| e["verdict"] == "deny" && e["dst"]["identity"] == "api", EVENT_WAIT)
        .expect("deny events for the rejected presentations");
    assert_eq!(deny["src"]["identity"], "world", "{deny:#}");
}

#[test]
fn rotation_replaces_the_certificate_without_dropping_anything() {
    let (t, _servers) = setup();
    let ca = new_ca("zt test CA");
    let presented = Presented::new(&t, &ca);
    presented.present(&valid(&ca));
    let agent = start(&t, &presented);
    identity_event(&agent, "bound", "verified");

    // A long-lived connection, and new connections opened back to back, across the rotation.
    let api = SocketAddr::new(t.ipv4("api"), 8080);
    let mut long_lived = t.ns("web").run(|| TcpStream::connect_timeout(&api, WAIT)).unwrap();
    long_lived.set_read_timeout(Some(WAIT)).unwrap();
    let start = Instant::now();
    let mut rotated = false;
    let mut new_connections = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if !rotated && start.elapsed() > Duration::from_secs(1) {
            presented.present(&valid(&ca));
            rotated = true;
        }
        assert!(tcp_connect(t.ns("web"), api, WAIT).is_ok(), "a new connection during the rotation was refused");
        new_connections += 1;
        long_lived.write_all(b"still here").unwrap();
        let mut echo = [0u8; 10];
        long_lived.read_exact(&mut echo).expect("the long-lived connection survives the rotation");
    }
    identity_event(&agent, "rotated", "renewed");
    assert!(new_connections > 5, "the rotation window saw only {new_connections} connections");
    assert_eq!(count(&agent, "revoked", "expired") + count(&agent, "rejected", "malformed"), 0);
}

#[test]
fn expiry_without_renewal_revokes_within_a_second() {
    let (t, _servers) = setup();
    let ca = new_ca("zt test CA");
    let presented = Presented::new(&t, &ca);
    // Long enough to outlast the agent's start (loading and verifying the programs takes a few
    // seconds on a busy machine): the SVID must still be valid when the agent first scans it.
    let lifetime = Duration::from_secs(8);
    presented.present(&svid(&ca, Some(WEB_ID), time::Duration::minutes(-5), time::Duration::seconds(8)));
    let issued = Instant::now();
    let agent = start(&t, &presented);
    identity_event(&agent, "bound", "verified");
    assert!(web_to_api(&t, WAIT), "before expiry\n{}", agent.stderr());
    // X.509 validity has one-second resolution: wait until one second past the expiry second.
    thread::sleep((issued + lifetime + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
    assert!(web_blocked(&t), "one second after expiry web must be denied\n{}", agent.stderr());
    let revoked = identity_event(&agent, "revoked", "expired");
    assert_eq!(revoked["spiffe_id"], WEB_ID);
}
