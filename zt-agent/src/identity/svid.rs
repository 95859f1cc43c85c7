//! X.509-SVIDs: the certificate identity source's pure core.
//!
//! Workloads prove their SPIFFE identity with an X.509-SVID. The agent watches a directory with
//! one subdirectory per workload:
//!
//! ```text
//! <dir>/<workload>/svid.pem   # PEM: the leaf certificate first, then intermediates (if any)
//! <dir>/<workload>/bind.yaml  # what the SVID is bound to:
//!                             # {addresses: [10.20.1.2, "fd00:20:1::2"], cgroup: "zt-demo/backup.service"}
//! ```
//!
//! This module reads and verifies; it keeps no state, starts no timers and touches no BPF map.
//!
//! A chain is accepted when, in this order:
//! 1. every PEM `CERTIFICATE` section decodes to one well-formed X.509 certificate
//!    ([`SvidError::Malformed`]);
//! 2. `now` lies within the leaf's validity period, both ends inclusive ([`SvidError::Expired`],
//!    [`SvidError::NotYetValid`]), checked here first so that the reason is precise;
//! 3. rustls-webpki builds a path from the leaf through the given intermediates to a root of the
//!    bundle at `now`, with the clientAuth EKU (when the leaf has an EKU extension), the leaf not
//!    a CA, every issuer a CA, and the signatures good ([`SvidError::Untrusted`]; an expired
//!    intermediate shows up here too);
//! 4. the leaf has neither keyCertSign nor cRLSign key usage (SPIFFE X.509-SVID §4.3,
//!    [`SvidError::Untrusted`]);
//! 5. the leaf carries exactly one URI SAN and it is a valid SPIFFE ID ([`SvidError::NoSpiffeId`],
//!    [`SvidError::MultipleSpiffeIds`], [`SvidError::InvalidSpiffeId`]).
//!
//! Identity is only read from a chain that verified: a certificate from another CA reports
//! `Untrusted`, whatever its SANs.
//!
//! Not done here: revocation (SVIDs are short-lived), and matching the SPIFFE ID's trust domain
//! against the bundle's (a bundle is a plain set of roots; see [`Svid::trust_domain`]).

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::bounded::{self, ReadError, BIND_FILE_LIMIT, CERTIFICATE_FILE_LIMIT};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;
use webpki::{EndEntityCert, KeyUsage, ALL_VERIFICATION_ALGS};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Longest SPIFFE ID, in bytes (SPIFFE ID spec §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name, in bytes (SPIFFE ID spec §2.1).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest `cgroup` in a `bind.yaml` (PATH_MAX).
const MAX_CGROUP_LEN: usize = 4096;

/// The file of a workload's certificate chain, in its directory.
pub const SVID_FILE: &str = "svid.pem";
/// The file of a workload's binding, in its directory.
pub const BIND_FILE: &str = "bind.yaml";

/// Why a chain is not an acceptable X.509-SVID.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SvidError {
    /// Unreadable or oversized file, bad PEM or DER, or no certificate at all.
    #[error("malformed SVID: {0}")]
    Malformed(String),
    /// The chain does not verify against the trust bundle (webpki's reason).
    #[error("untrusted SVID: {0}")]
    Untrusted(String),
    #[error("SVID expired at {}", fmt_time(*not_after))]
    Expired { not_after: SystemTime },
    #[error("SVID not valid before {}", fmt_time(*not_before))]
    NotYetValid { not_before: SystemTime },
    /// No URI SAN with the `spiffe` scheme.
    #[error("SVID carries no SPIFFE ID (no spiffe:// URI SAN)")]
    NoSpiffeId,
    /// More than one URI SAN: an X.509-SVID carries exactly one, its SPIFFE ID (SPIFFE X.509-SVID
    /// spec §2), so a second SPIFFE ID, or any other URI next to it, is refused.
    #[error(
        "SVID carries {uris} URI SANs ({spiffe_ids} of them spiffe://); an SVID carries exactly one, its SPIFFE ID"
    )]
    MultipleSpiffeIds { uris: usize, spiffe_ids: usize },
    /// The one `spiffe:` URI SAN is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID: {0}")]
    InvalidSpiffeId(String),
}

impl SvidError {
    /// A short stable name of the reason, for events and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SvidError::Malformed(_) => "malformed",
            SvidError::Untrusted(_) => "untrusted",
            SvidError::Expired { .. } => "expired",
            SvidError::NotYetValid { .. } => "not-yet-valid",
            SvidError::NoSpiffeId => "no-spiffe-id",
            SvidError::MultipleSpiffeIds { .. } => "multiple-spiffe-ids",
            SvidError::InvalidSpiffeId(_) => "invalid-spiffe-id",
        }
    }
}

/// The roots that SVIDs must chain to.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Reads a PEM bundle file (one or more `CERTIFICATE` sections, at most
    /// [`CERTIFICATE_FILE_LIMIT`] bytes).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let pem = bounded::read(path, CERTIFICATE_FILE_LIMIT)
            .with_context(|| format!("reading trust bundle {}", path.display()))?;
        Self::from_pem(&pem).with_context(|| format!("trust bundle {}", path.display()))
    }

    /// Parses a PEM bundle: every `CERTIFICATE` section is a trusted root; other sections are
    /// ignored. Roots are trusted as they are: their own validity period is not checked.
    pub fn from_pem(pem: &[u8]) -> Result<Self, SvidError> {
        let ders = parse_pem_certs(pem)?;
        let anchors = ders
            .iter()
            .enumerate()
            .map(|(i, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| SvidError::Malformed(format!("certificate {} of the bundle: {e:?}", i + 1)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { anchors })
    }

    /// How many roots the bundle holds (at least one).
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Always false: a bundle without a root is refused.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

/// A verified X.509-SVID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svid {
    /// The leaf's SPIFFE ID, validated (`spiffe://trust-domain/path`).
    pub spiffe_id: String,
    /// The leaf's validity period, both ends inclusive.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the leaf certificate's DER.
    pub fingerprint: [u8; 32],
}

impl Svid {
    /// The trust domain name of the SPIFFE ID (`example.org` in `spiffe://example.org/a`).
    pub fn trust_domain(&self) -> &str {
        let rest = self.spiffe_id.strip_prefix("spiffe://").unwrap_or(&self.spiffe_id);
        rest.split('/').next().unwrap_or(rest)
    }

    /// The fingerprint in lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Verifies a PEM chain (leaf first, then intermediates) against `bundle` at `now`.
pub fn verify(chain_pem: &[u8], bundle: &TrustBundle, now: SystemTime) -> Result<Svid, SvidError> {
    let ders = parse_pem_certs(chain_pem)?;
    // Every certificate must be well-formed DER, not only those webpki happens to look at.
    let mut parsed = Vec::with_capacity(ders.len());
    for (i, der) in ders.iter().enumerate() {
        let which = if i == 0 { "the leaf certificate".to_owned() } else { format!("certificate {}", i + 1) };
        match X509Certificate::from_der(der) {
            Ok(([], cert)) => parsed.push(cert),
            Ok(_) => return Err(SvidError::Malformed(format!("{which}: trailing data after the DER"))),
            Err(e) => return Err(SvidError::Malformed(format!("{which}: {e}"))),
        }
    }
    let leaf = &parsed[0];

    let validity = leaf.validity();
    let not_before = system_time(validity.not_before.timestamp())
        .ok_or_else(|| SvidError::Malformed("the leaf's notBefore is out of range".into()))?;
    let not_after = system_time(validity.not_after.timestamp())
        .ok_or_else(|| SvidError::Malformed("the leaf's notAfter is out of range".into()))?;
    if now < not_before {
        return Err(SvidError::NotYetValid { not_before });
    }
    if now > not_after {
        return Err(SvidError::Expired { not_after });
    }

    let end_entity =
        EndEntityCert::try_from(&ders[0]).map_err(|e| SvidError::Malformed(format!("the leaf certificate: {e:?}")))?;
    let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    end_entity
        .verify_for_usage(ALL_VERIFICATION_ALGS, &bundle.anchors, &ders[1..], time, KeyUsage::client_auth(), None, None)
        .map_err(|e| SvidError::Untrusted(describe_webpki_error(&e)))?;

    match leaf.key_usage() {
        Ok(Some(usage)) if usage.value.key_cert_sign() || usage.value.crl_sign() => {
            return Err(SvidError::Untrusted(
                "the leaf has keyCertSign or cRLSign key usage, which an SVID must not have".into(),
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(SvidError::Malformed(format!("the leaf's key usage: {e}"))),
    }

    let spiffe_id = spiffe_id_of(leaf)?;
    Ok(Svid { spiffe_id, not_before, not_after, fingerprint: Sha256::digest(ders[0].as_ref()).into() })
}

/// Checks a SPIFFE ID against the SPIFFE ID spec: `spiffe://`, a lowercase trust domain of
/// `[a-z0-9._-]`, then optionally a path of non-empty `/`-separated segments of `[A-Za-z0-9._-]`,
/// none of them `.` or `..`; no query, fragment, port, userinfo or percent-encoding; at most
/// [`MAX_SPIFFE_ID_LEN`] bytes. The error says what is wrong.
pub fn validate_spiffe_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Err(format!("{} bytes long, at most {MAX_SPIFFE_ID_LEN} are allowed", id.len()));
    }
    let rest = id.strip_prefix("spiffe://").ok_or("the scheme must be \"spiffe://\", in lowercase")?;
    let (trust_domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if trust_domain.is_empty() {
        return Err("the trust domain is missing".into());
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes"));
    }
    for c in trust_domain.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err("the trust domain must be lowercase".into()),
            _ => return Err(misplaced(c, "the trust domain (allowed: a-z 0-9 . - _)")),
        }
    }
    if path.is_empty() {
        return Ok(());
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err("the path has an empty segment (a doubled or trailing '/')".into()),
            "." | ".." => return Err(format!("the path has a \"{segment}\" segment")),
            _ => {}
        }
        for c in segment.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                _ => return Err(misplaced(c, "the path (allowed: A-Z a-z 0-9 . - _)")),
            }
        }
    }
    Ok(())
}

fn misplaced(c: char, place: &str) -> String {
    match c {
        ':' => "a port is not allowed".into(),
        '@' => "userinfo is not allowed".into(),
        '?' => "a query is not allowed".into(),
        '#' => "a fragment is not allowed".into(),
        '%' => "percent-encoding is not allowed".into(),
        _ => format!("character {c:?} is not allowed in {place}"),
    }
}

/// What a workload's SVID is bound to: the addresses it sends from, its cgroup, or both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Unicast addresses; IPv4-mapped IPv6 addresses are stored as IPv4.
    pub addresses: Vec<IpAddr>,
    /// A cgroup path relative to the cgroup2 root, e.g. `zt-demo/backup.service`.
    pub cgroup: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindFile {
    #[serde(default)]
    addresses: Vec<IpAddr>,
    #[serde(default)]
    cgroup: Option<String>,
}

impl Binding {
    /// Parses a `bind.yaml`: `addresses` (a list), `cgroup` (a string), at least one of the two,
    /// nothing else.
    pub fn from_yaml(yaml: &[u8]) -> Result<Self, String> {
        if yaml.len() as u64 > BIND_FILE_LIMIT {
            return Err(too_large(yaml, BIND_FILE_LIMIT));
        }
        let file: BindFile = serde_yaml::from_slice(yaml).map_err(|e| e.to_string())?;
        if file.addresses.is_empty() && file.cgroup.is_none() {
            return Err("binds to nothing: give addresses, a cgroup, or both".into());
        }
        let mut addresses = Vec::with_capacity(file.addresses.len());
        for address in file.addresses {
            let address = address.to_canonical();
            let unicast = match address {
                IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
                IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
            };
            if !unicast {
                return Err(format!("address {address} is not a unicast address"));
            }
            addresses.push(address);
        }
        if let Some(cgroup) = &file.cgroup {
            check_cgroup(cgroup)?;
        }
        Ok(Self { addresses, cgroup: file.cgroup })
    }
}

fn check_cgroup(cgroup: &str) -> Result<(), String> {
    if cgroup.len() > MAX_CGROUP_LEN {
        return Err(format!("cgroup is longer than {MAX_CGROUP_LEN} bytes"));
    }
    if cgroup.is_empty() {
        return Err("cgroup is empty".into());
    }
    if cgroup.starts_with('/') {
        return Err(format!("cgroup \"{cgroup}\" must be relative to the cgroup2 root (no leading '/')"));
    }
    if cgroup.contains('\0') {
        return Err("cgroup contains a NUL character".into());
    }
    for component in cgroup.split('/') {
        match component {
            "" => return Err(format!("cgroup \"{cgroup}\" has an empty component (a doubled or trailing '/')")),
            "." | ".." => return Err(format!("cgroup \"{cgroup}\" has a \"{component}\" component")),
            _ => {}
        }
    }
    Ok(())
}

/// One workload directory as found by [`scan`]: its binding and its SVID, each checked on its
/// own (a bad `bind.yaml` does not hide the SVID's result, nor the other way round).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presentation {
    /// The subdirectory's name.
    pub workload: String,
    pub dir: PathBuf,
    pub binding: Result<Binding, String>,
    pub svid: Result<Svid, SvidError>,
}

/// Reads every workload directory under `dir`, sorted by workload name.
///
/// Subdirectories (and symlinks to directories) are workloads; plain files and names starting
/// with `.` (editors' and atomic writers' temporaries, `..data` links) are skipped, as is an
/// entry that vanishes during the scan. A subdirectory without `svid.pem` yields
/// `svid: Err(Malformed("no svid.pem"))`, one without `bind.yaml` `binding: Err("no bind.yaml")`.
/// Each file is read once, at most [`CERTIFICATE_FILE_LIMIT`] or [`BIND_FILE_LIMIT`] bytes of it,
/// and only if it is a regular file (a FIFO or device is refused). A missing or unreadable `dir`
/// is an error.
pub fn scan(dir: &Path, bundle: &TrustBundle, now: SystemTime) -> anyhow::Result<Vec<Presentation>> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading SVID directory {}", dir.display()))?;
    let mut presentations = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading SVID directory {}", dir.display()))?;
        let name = entry.file_name();
        if name.as_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        let workload = name.to_string_lossy().into_owned();
        let unreadable = |why: String| Presentation {
            workload: workload.clone(),
            dir: path.clone(),
            binding: Err(why.clone()),
            svid: Err(SvidError::Malformed(why)),
        };
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                presentations.push(unreadable(format!("workload directory: {e}")));
                continue;
            }
        }
        if name.to_str().is_none() {
            presentations.push(unreadable("the workload directory's name is not UTF-8".into()));
            continue;
        }
        let svid = read_workload_file(&path, SVID_FILE, CERTIFICATE_FILE_LIMIT)
            .map_err(SvidError::Malformed)
            .and_then(|pem| verify(&pem, bundle, now));
        let binding = read_workload_file(&path, BIND_FILE, BIND_FILE_LIMIT)
            .and_then(|yaml| Binding::from_yaml(&yaml).map_err(|e| format!("{BIND_FILE}: {e}")));
        presentations.push(Presentation { workload, dir: path, binding, svid });
    }
    presentations.sort_by(|a, b| a.workload.cmp(&b.workload).then_with(|| a.dir.cmp(&b.dir)));
    Ok(presentations)
}

fn read_workload_file(dir: &Path, name: &str, limit: u64) -> Result<Vec<u8>, String> {
    bounded::read(&dir.join(name), limit).map_err(|e| match e {
        ReadError::NotFound => format!("no {name}"),
        e => format!("{name}: {e}"),
    })
}

/// What a file read in full says when over `limit`: the bytes given here need not come from
/// [`bounded::read`].
fn too_large(bytes: &[u8], limit: u64) -> String {
    ReadError::TooLarge { size: Some(bytes.len() as u64), limit }.to_string()
}

/// The DER of every `CERTIFICATE` section, in order; other sections are skipped.
fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, SvidError> {
    if pem.len() as u64 > CERTIFICATE_FILE_LIMIT {
        return Err(SvidError::Malformed(too_large(pem, CERTIFICATE_FILE_LIMIT)));
    }
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Err(SvidError::Malformed("empty file".into()));
    }
    let ders = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Malformed(format!("PEM: {e}")))?;
    if ders.is_empty() {
        return Err(SvidError::Malformed("no CERTIFICATE in the PEM".into()));
    }
    Ok(ders)
}

/// The leaf's one SPIFFE ID.
fn spiffe_id_of(leaf: &X509Certificate<'_>) -> Result<String, SvidError> {
    let san =
        leaf.subject_alternative_name().map_err(|e| SvidError::Malformed(format!("the leaf's subjectAltName: {e}")))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    // The scheme is case-insensitive in URIs: "SPIFFE://..." is a SPIFFE ID, an invalid one.
    let is_spiffe = |uri: &&&str| uri.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe:"));
    let spiffe_ids = uris.iter().filter(is_spiffe).count();
    if spiffe_ids == 0 {
        return Err(SvidError::NoSpiffeId);
    }
    if uris.len() > 1 {
        return Err(SvidError::MultipleSpiffeIds { uris: uris.len(), spiffe_ids });
    }
    validate_spiffe_id(uris[0]).map_err(SvidError::InvalidSpiffeId)?;
    Ok(uris[0].to_owned())
}

fn describe_webpki_error(error: &webpki::Error) -> String {
    use webpki::Error::*;
    let hint = match error {
        UnknownIssuer => "no path to a root of the trust bundle",
        CertExpired { .. } => "a certificate of the chain has expired",
        CertNotValidYet { .. } => "a certificate of the chain is not valid yet",
        RequiredEkuNotFoundContext(_) => "the leaf's extended key usage lacks clientAuth",
        CaUsedAsEndEntity => "the leaf is a CA certificate",
        EndEntityUsedAsCa => "an intermediate is not a CA certificate",
        InvalidSignatureForPublicKey => "a signature does not verify",
        UnsupportedSignatureAlgorithmContext(_) | UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "a signature algorithm is not supported"
        }
        BadDer | BadDerTime | TrailingData(_) => "a certificate of the chain is not well-formed",
        _ => "chain verification failed",
    };
    format!("{hint} ({error:?})")
}

/// Seconds from the Unix epoch as a `SystemTime`, `None` if out of its range.
fn system_time(seconds: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    if seconds >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

/// RFC 3339 for times humantime can print (1970 to 9999), seconds from the epoch otherwise:
/// its formatter panics on times before 1970 and a certificate may carry one.
fn fmt_time(time: SystemTime) -> String {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) if since.as_secs() < 253_402_300_800 => humantime::format_rfc3339_seconds(time).to_string(),
        Ok(since) => format!("{}s after the Unix epoch", since.as_secs()),
        Err(e) => format!("{}s before the Unix epoch", e.duration().as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::string::Ia5String;
    use rcgen::{
        date_time_ymd, BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };

    struct Ca {
        cert: Certificate,
        issuer: Issuer<'static, KeyPair>,
    }

    type Ymd = (i32, u8, u8);

    const BEFORE: Ymd = (2030, 1, 1);
    const AFTER: Ymd = (2031, 1, 1);

    fn at((y, m, d): Ymd) -> SystemTime {
        system_time(date_time_ymd(y, m, d).unix_timestamp()).unwrap()
    }

    fn now() -> SystemTime {
        at((2030, 6, 1))
    }

    fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2040, 1, 1);
        params
    }

    fn root(name: &str) -> Ca {
        let params = ca_params(name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, issuer: Issuer::new(params, key) }
    }

    fn intermediate(parent: &Ca, name: &str, not_after: Ymd) -> Ca {
        let mut params = ca_params(name);
        params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &parent.issuer).unwrap();
        Ca { cert, issuer: Issuer::new(params, key) }
    }

    fn leaf_params(uris: &[&str], (nb, na): (Ymd, Ymd)) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "workload");
        params.subject_alt_names = uris.iter().map(|uri| SanType::URI(Ia5String::try_from(*uri).unwrap())).collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = date_time_ymd(nb.0, nb.1, nb.2);
        params.not_after = date_time_ymd(na.0, na.1, na.2);
        params
    }

    fn sign(params: CertificateParams, issuer: &Ca) -> Certificate {
        params.signed_by(&KeyPair::generate().unwrap(), &issuer.issuer).unwrap()
    }

    fn leaf(issuer: &Ca, uris: &[&str], validity: (Ymd, Ymd)) -> Certificate {
        sign(leaf_params(uris, validity), issuer)
    }

    fn chain(certs: &[&Certificate]) -> Vec<u8> {
        certs.iter().map(|cert| cert.pem()).collect::<String>().into_bytes()
    }

    fn bundle(ca: &Ca) -> TrustBundle {
        TrustBundle::from_pem(ca.cert.pem().as_bytes()).unwrap()
    }

    const ID: &str = "spiffe://example.org/ns/prod/sa/backup";

    #[test]
    fn svid_valid_leaf_under_root() {
        let ca = root("root");
        let leaf = leaf(&ca, &[ID], (BEFORE, AFTER));
        let svid = verify(&chain(&[&leaf]), &bundle(&ca), now()).unwrap();
        assert_eq!(svid.spiffe_id, ID);
        assert_eq!(svid.trust_domain(), "example.org");
        assert_eq!(svid.fingerprint, <[u8; 32]>::from(Sha256::digest(leaf.der().as_ref())));
        assert_eq!(svid.fingerprint_hex().len(), 64);
        assert_eq!(svid.not_before, at(BEFORE));
        assert_eq!(svid.not_after, at(AFTER));
        // Both ends of the validity period are inclusive.
        assert!(verify(&chain(&[&leaf]), &bundle(&ca), at(BEFORE)).is_ok());
        assert!(verify(&chain(&[&leaf]), &bundle(&ca), at(AFTER)).is_ok());
    }

    #[test]
    fn svid_valid_leaf_via_intermediate() {
        let ca = root("root");
        let mid = intermediate(&ca, "intermediate", (2040, 1, 1));
        let leaf = leaf(&mid, &[ID], (BEFORE, AFTER));
        let svid = verify(&chain(&[&leaf, &mid.cert]), &bundle(&ca), now()).unwrap();
        assert_eq!(svid.spiffe_id, ID);
        // Without the intermediate there is no path to the root.
        let err = verify(&chain(&[&leaf]), &bundle(&ca), now()).unwrap_err();
        assert!(matches!(&err, SvidError::Untrusted(why) if why.contains("UnknownIssuer")), "{err}");
        // An expired intermediate breaks the chain.
        let old = intermediate(&ca, "old intermediate", (2030, 3, 1));
        let leaf = self::leaf(&old, &[ID], (BEFORE, AFTER));
        let err = verify(&chain(&[&leaf, &old.cert]), &bundle(&ca), now()).unwrap_err();
        assert!(matches!(&err, SvidError::Untrusted(why) if why.contains("expired")), "{err}");
    }

    #[test]
    fn svid_bundle_with_several_roots() {
        let (a, b) = (root("a"), root("b"));
        let both = TrustBundle::from_pem(&chain(&[&a.cert, &b.cert])).unwrap();
        assert_eq!(both.len(), 2);
        assert!(verify(&chain(&[&leaf(&a, &[ID], (BEFORE, AFTER))]), &both, now()).is_ok());
        assert!(verify(&chain(&[&leaf(&b, &[ID], (BEFORE, AFTER))]), &both, now()).is_ok());
    }

    #[test]
    fn svid_expired_and_not_yet_valid() {
        let ca = root("root");
        let leaf = leaf(&ca, &[ID], (BEFORE, AFTER));
        let err = verify(&chain(&[&leaf]), &bundle(&ca), at((2031, 1, 2))).unwrap_err();
        assert_eq!(err, SvidError::Expired { not_after: at(AFTER) });
        assert_eq!(err.kind(), "expired");
        assert_eq!(err.to_string(), "SVID expired at 2031-01-01T00:00:00Z");
        let err = verify(&chain(&[&leaf]), &bundle(&ca), at((2029, 12, 31))).unwrap_err();
        assert_eq!(err, SvidError::NotYetValid { not_before: at(BEFORE) });
        assert_eq!(err.kind(), "not-yet-valid");
        // A period before 1970 prints without panicking.
        let ancient = self::leaf(&ca, &[ID], ((1960, 1, 1), (1965, 1, 1)));
        let err = verify(&chain(&[&ancient]), &bundle(&ca), now()).unwrap_err();
        assert!(err.to_string().contains("before the Unix epoch"), "{err}");
    }

    #[test]
    fn svid_from_another_ca_is_untrusted() {
        let (ca, other) = (root("root"), root("other"));
        let leaf = leaf(&other, &[ID], (BEFORE, AFTER));
        let err = verify(&chain(&[&leaf]), &bundle(&ca), now()).unwrap_err();
        assert!(matches!(err, SvidError::Untrusted(_)), "{err}");
        assert_eq!(err.kind(), "untrusted");
        // Whatever its SANs: identity is only read from a verified chain.
        let leaf = self::leaf(&other, &[], (BEFORE, AFTER));
        assert_eq!(verify(&chain(&[&leaf]), &bundle(&ca), now()).unwrap_err().kind(), "untrusted");
        // Appending the foreign root to the chain does not help.
        let leaf = self::leaf(&other, &[ID], (BEFORE, AFTER));
        assert_eq!(verify(&chain(&[&leaf, &other.cert]), &bundle(&ca), now()).unwrap_err().kind(), "untrusted");
    }

    #[test]
    fn svid_leaf_usage_is_checked() {
        let ca = root("root");
        let mut params = leaf_params(&[ID], (BEFORE, AFTER));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let err = verify(&chain(&[&sign(params, &ca)]), &bundle(&ca), now()).unwrap_err();
        assert!(matches!(&err, SvidError::Untrusted(why) if why.contains("clientAuth")), "{err}");

        let mut params = leaf_params(&[ID], (BEFORE, AFTER));
        params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        let err = verify(&chain(&[&sign(params, &ca)]), &bundle(&ca), now()).unwrap_err();
        assert!(matches!(&err, SvidError::Untrusted(why) if why.contains("keyCertSign")), "{err}");

        let mut params = leaf_params(&[ID], (BEFORE, AFTER));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let err = verify(&chain(&[&sign(params, &ca)]), &bundle(&ca), now()).unwrap_err();
        assert!(matches!(&err, SvidError::Untrusted(why) if why.contains("CA")), "{err}");
    }

    #[test]
    fn svid_spiffe_id_sans() {
        let ca = root("root");
        let check = |uris: &[&str]| verify(&chain(&[&leaf(&ca, uris, (BEFORE, AFTER))]), &bundle(&ca), now());
        assert_eq!(check(&[]), Err(SvidError::NoSpiffeId));
        assert_eq!(check(&[]).unwrap_err().kind(), "no-spiffe-id");
        assert_eq!(check(&["https://example.org/backup"]), Err(SvidError::NoSpiffeId));
        let err = check(&[ID, "spiffe://example.org/other"]).unwrap_err();
        assert_eq!(err, SvidError::MultipleSpiffeIds { uris: 2, spiffe_ids: 2 });
        assert_eq!(err.kind(), "multiple-spiffe-ids");
        assert_eq!(
            check(&[ID, "https://example.org/backup"]),
            Err(SvidError::MultipleSpiffeIds { uris: 2, spiffe_ids: 1 })
        );
        let err = check(&["spiffe://Example.org/backup"]).unwrap_err();
        assert!(matches!(&err, SvidError::InvalidSpiffeId(why) if why.contains("lowercase")), "{err}");
        assert_eq!(err.kind(), "invalid-spiffe-id");
        assert!(matches!(check(&["SPIFFE://example.org/backup"]), Err(SvidError::InvalidSpiffeId(_))));
        assert!(matches!(check(&["spiffe://example.org/a/../b"]), Err(SvidError::InvalidSpiffeId(_))));
        assert_eq!(check(&["spiffe://example.org"]).unwrap().spiffe_id, "spiffe://example.org");
    }

    #[test]
    fn svid_spiffe_id_validation() {
        let long_path = format!("spiffe://example.org/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 21));
        assert_eq!(long_path.len(), MAX_SPIFFE_ID_LEN);
        for ok in [
            "spiffe://example.org",
            "spiffe://example.org/a",
            "spiffe://trust-domain_1.example/ns/Prod/sa/back.up-1_x",
            "spiffe://example.org/...",
            long_path.as_str(),
        ] {
            assert_eq!(validate_spiffe_id(ok), Ok(()), "{ok}");
        }
        let too_long = format!("{long_path}a");
        let long_domain = format!("spiffe://{}/a", "d".repeat(256));
        for (bad, why) in [
            ("", "scheme"),
            ("spiffe:/example.org/a", "scheme"),
            ("https://example.org/a", "scheme"),
            ("Spiffe://example.org/a", "scheme"),
            ("spiffe://", "missing"),
            ("spiffe:///a", "missing"),
            ("spiffe://Example.org/a", "lowercase"),
            ("spiffe://exa mple.org/a", "not allowed"),
            ("spiffe://exämple.org/a", "not allowed"),
            ("spiffe://example.org:8443/a", "port"),
            ("spiffe://user@example.org/a", "userinfo"),
            ("spiffe://example.org?x=1", "query"),
            ("spiffe://example.org/a?x=1", "query"),
            ("spiffe://example.org/a#frag", "fragment"),
            ("spiffe://example.org/a%2Fb", "percent"),
            ("spiffe://example.org/", "empty segment"),
            ("spiffe://example.org/a/", "empty segment"),
            ("spiffe://example.org//a", "empty segment"),
            ("spiffe://example.org/./a", "\".\""),
            ("spiffe://example.org/a/..", "\"..\""),
            ("spiffe://example.org/a b", "not allowed"),
            ("spiffe://example.org/a\0b", "not allowed"),
            (too_long.as_str(), "at most 2048"),
            (long_domain.as_str(), "longer than 255"),
        ] {
            let err = validate_spiffe_id(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn svid_malformed_input() {
        let ca = root("root");
        let bundle = bundle(&ca);
        for (input, why) in [
            (&b""[..], "empty"),
            (b"\n  \n", "empty"),
            (b"garbage", "no CERTIFICATE"),
            (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no CERTIFICATE"),
            (b"-----BEGIN CERTIFICATE-----\nAAAA\n", "PEM"),
            (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "PEM"),
            (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "leaf"),
        ] {
            let err = verify(input, &bundle, now()).unwrap_err();
            assert!(matches!(&err, SvidError::Malformed(m) if m.contains(why)), "{input:?}: {err}");
            assert_eq!(err.kind(), "malformed");
        }
        // A good leaf followed by a broken intermediate.
        let leaf = leaf(&ca, &[ID], (BEFORE, AFTER));
        let mut pem = chain(&[&leaf]);
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n");
        let err = verify(&pem, &bundle, now()).unwrap_err();
        assert!(matches!(&err, SvidError::Malformed(m) if m.contains("certificate 2")), "{err}");
        // Trailing bytes after the leaf's DER.
        let mut der = leaf.der().to_vec();
        der.push(0);
        let pem = pem_of(&der);
        let err = verify(pem.as_bytes(), &bundle, now()).unwrap_err();
        assert!(matches!(&err, SvidError::Malformed(m) if m.contains("trailing")), "{err}");
        // Over the size limit, even if it would parse.
        let mut huge = chain(&[&leaf]);
        huge.resize(CERTIFICATE_FILE_LIMIT as usize + 1, b'\n');
        let err = verify(&huge, &bundle, now()).unwrap_err();
        assert_eq!(err.to_string(), "malformed SVID: it is 1048577 bytes; the limit is 1048576 bytes");
        // Bundles too.
        assert!(matches!(TrustBundle::from_pem(b""), Err(SvidError::Malformed(_))));
        assert!(matches!(TrustBundle::from_pem(b"nothing here"), Err(SvidError::Malformed(_))));
        assert!(matches!(TrustBundle::from_pem(pem.as_bytes()), Err(SvidError::Malformed(_))));
    }

    fn pem_of(der: &[u8]) -> String {
        let b64 = base64_encode(der);
        let body: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", body.join("\n"))
    }

    fn base64_encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Hostile input never panics: random bytes, and valid chains with bytes of their DER or PEM
    /// flipped, truncated or extended, all come back as an error (or, rarely, still verify).
    #[test]
    fn svid_hostile_input_does_not_panic() {
        let ca = root("root");
        let mid = intermediate(&ca, "intermediate", (2040, 1, 1));
        let bundle = bundle(&ca);
        let leaf = leaf(&mid, &[ID], (BEFORE, AFTER));
        let good_ders = [leaf.der().to_vec(), mid.cert.der().to_vec()];
        let mut rng = fastrand::Rng::with_seed(0x5_1d);
        for round in 0..3000 {
            let input: Vec<u8> = match round % 4 {
                0 => (0..rng.usize(0..512)).map(|_| rng.u8(..)).collect(),
                1 | 2 => {
                    let mut ders = good_ders.clone();
                    let which = rng.usize(..2);
                    let der = &mut ders[which];
                    for _ in 0..rng.usize(1..4) {
                        match rng.u8(0..3) {
                            0 if !der.is_empty() => {
                                let i = rng.usize(..der.len());
                                der[i] ^= 1 << rng.u8(0..8);
                            }
                            1 => der.truncate(rng.usize(..=der.len())),
                            _ => {
                                let i = rng.usize(..=der.len());
                                der.insert(i, rng.u8(..));
                            }
                        }
                    }
                    ders.iter().map(|d| pem_of(d)).collect::<String>().into_bytes()
                }
                _ => {
                    let mut pem = chain(&[&leaf, &mid.cert]);
                    let i = rng.usize(..pem.len());
                    pem[i] = rng.u8(..);
                    pem
                }
            };
            if let Ok(svid) = verify(&input, &bundle, now()) {
                assert_eq!(svid.spiffe_id, ID);
            }
            let _ = TrustBundle::from_pem(&input);
            let _ = Binding::from_yaml(&input);
        }
    }

    #[test]
    fn svid_binding_yaml() {
        let binding = Binding::from_yaml(
            b"addresses: [10.20.1.2, \"fd00:20:1::2\", \"::ffff:10.20.1.3\"]\ncgroup: zt-demo/backup.service\n",
        )
        .unwrap();
        assert_eq!(binding.addresses, ["10.20.1.2", "fd00:20:1::2", "10.20.1.3"].map(|a| a.parse::<IpAddr>().unwrap()));
        assert_eq!(binding.cgroup.as_deref(), Some("zt-demo/backup.service"));
        assert_eq!(Binding::from_yaml(b"cgroup: a.slice/b.service").unwrap().addresses, Vec::<IpAddr>::new());
        assert_eq!(Binding::from_yaml(b"addresses: [10.0.0.1]").unwrap().cgroup, None);
        for (bad, why) in [
            (&b""[..], ""),
            (b"{}", "binds to nothing"),
            (b"addresses: []", "binds to nothing"),
            (b"addresses: [10.0.0.1]\nextra: 1", "unknown field"),
            (b"addresses: [10.0.0.300]", ""),
            (b"addresses: 10.0.0.1", ""),
            (b"addresses: [0.0.0.0]", "unicast"),
            (b"addresses: [\"::\"]", "unicast"),
            (b"addresses: [224.0.0.1]", "unicast"),
            (b"addresses: [255.255.255.255]", "unicast"),
            (b"cgroup: /zt-demo/backup.service", "relative"),
            (b"cgroup: zt-demo/../other.service", "\"..\""),
            (b"cgroup: ./x", "\".\""),
            (b"cgroup: a//b", "empty component"),
            (b"cgroup: a/", "empty component"),
            (b"cgroup: \"\"", "empty"),
            (b"cgroup: [a]", ""),
            (b"- 10.0.0.1", ""),
        ] {
            let err = Binding::from_yaml(bad).unwrap_err();
            assert!(err.contains(why), "{:?}: {err}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn svid_scan_directory() {
        let ca = root("root");
        let bundle = bundle(&ca);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let workload = |name: &str, svid: Option<&[u8]>, bind: Option<&[u8]>| {
            let path = dir.join(name);
            fs::create_dir(&path).unwrap();
            if let Some(svid) = svid {
                fs::write(path.join(SVID_FILE), svid).unwrap();
            }
            if let Some(bind) = bind {
                fs::write(path.join(BIND_FILE), bind).unwrap();
            }
        };
        let good = leaf(&ca, &[ID], (BEFORE, AFTER));
        let expired = leaf(&ca, &["spiffe://example.org/old"], ((2029, 1, 1), (2030, 1, 1)));
        let bind = &b"addresses: [10.20.1.2]\ncgroup: zt-demo/backup.service\n"[..];
        workload("backup", Some(&chain(&[&good])), Some(bind));
        workload("old", Some(&chain(&[&expired])), Some(bind));
        workload("nosvid", None, Some(bind));
        workload("badbind", Some(&chain(&[&good])), Some(b"addresses: [10.20.1.2]\nport: 1\n"));
        workload("nobind", Some(&chain(&[&good])), None);
        workload(
            "huge",
            Some(&vec![b'\n'; CERTIFICATE_FILE_LIMIT as usize + 1]),
            Some(&vec![b'\n'; BIND_FILE_LIMIT as usize + 1]),
        );
        workload(".tmp-write", Some(&chain(&[&good])), Some(bind));
        fs::write(dir.join("README"), "not a workload").unwrap();
        fs::create_dir(dir.join("fifo")).unwrap();
        nix::unistd::mkfifo(&dir.join("fifo").join(SVID_FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink(dir.join("backup"), dir.join("linked")).unwrap();

        let found = scan(dir, &bundle, now()).unwrap();
        let names: Vec<&str> = found.iter().map(|p| p.workload.as_str()).collect();
        assert_eq!(names, ["backup", "badbind", "fifo", "huge", "linked", "nobind", "nosvid", "old"]);
        let by_name = |name: &str| found.iter().find(|p| p.workload == name).unwrap();

        let backup = by_name("backup");
        assert_eq!(backup.dir, dir.join("backup"));
        assert_eq!(backup.svid.as_ref().unwrap().spiffe_id, ID);
        let binding = backup.binding.as_ref().unwrap();
        assert_eq!(binding.addresses, ["10.20.1.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(binding.cgroup.as_deref(), Some("zt-demo/backup.service"));
        assert_eq!(by_name("linked").svid, backup.svid);

        assert_eq!(by_name("old").svid, Err(SvidError::Expired { not_after: at((2030, 1, 1)) }));
        assert!(by_name("old").binding.is_ok());

        assert_eq!(by_name("nosvid").svid, Err(SvidError::Malformed("no svid.pem".into())));
        assert!(by_name("nosvid").binding.is_ok());

        let badbind = by_name("badbind");
        assert!(badbind.svid.is_ok());
        assert!(badbind.binding.as_ref().unwrap_err().contains("unknown field `port`"), "{:?}", badbind.binding);

        assert_eq!(by_name("nobind").binding, Err("no bind.yaml".into()));
        let huge = by_name("huge");
        assert_eq!(huge.svid, Err(SvidError::Malformed("svid.pem: it is 1048577 bytes; the limit is 1048576 bytes".into())));
        assert_eq!(huge.binding, Err("bind.yaml: it is 65537 bytes; the limit is 65536 bytes".into()));
        assert_eq!(by_name("fifo").svid, Err(SvidError::Malformed("svid.pem: not a regular file (a FIFO)".into())));

        // A missing directory is an error, an empty one is not.
        assert!(scan(&dir.join("missing"), &bundle, now()).is_err());
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(scan(empty.path(), &bundle, now()).unwrap(), []);
    }

    #[test]
    fn svid_bundle_load() {
        let ca = root("root");
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bundle.pem");
        fs::write(&path, ca.cert.pem()).unwrap();
        let bundle = TrustBundle::load(&path).unwrap();
        assert_eq!(bundle.len(), 1);
        assert!(verify(&chain(&[&leaf(&ca, &[ID], (BEFORE, AFTER))]), &bundle, now()).is_ok());
        assert!(TrustBundle::load(&tmp.path().join("missing.pem")).is_err());
        fs::write(&path, "no certificates").unwrap();
        let err = TrustBundle::load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("no CERTIFICATE"), "{err:#}");
        let fifo = tmp.path().join("fifo.pem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = TrustBundle::load(&fifo).unwrap_err();
        assert_eq!(format!("{err:#}"), format!("reading trust bundle {}: not a regular file (a FIFO)", fifo.display()));
    }
}
