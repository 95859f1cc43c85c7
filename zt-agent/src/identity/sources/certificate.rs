//! The certificate source: a workload proves its identity with an X.509 SVID in the watched
//! directory. Only a chain that verifies against the trust bundle, inside its validity period,
//! with one SPIFFE ID that an identity selects, binds the workload's addresses or cgroup; every
//! other outcome leaves the workload unidentified (so default-deny) and is reported.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    time::SystemTime,
};

use serde_json::{json, Value};

use crate::{
    identity::svid::{self, Presentation, TrustBundle},
    policy::compile::SpiffeMatcher,
};

/// What a verified SVID binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub identity: u32,
    pub spiffe_id: String,
    pub addresses: Vec<IpAddr>,
    pub cgroup: Option<String>,
    pub not_after: SystemTime,
    fingerprint: [u8; 32],
}

/// A workload's state, to report transitions once rather than on every scan.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Bound(Bound),
    Rejected { reason: String, detail: String },
}

pub struct CertificateSource {
    dir: PathBuf,
    bundle: TrustBundle,
    states: BTreeMap<String, State>,
}

impl CertificateSource {
    pub fn new(dir: PathBuf, bundle: TrustBundle) -> Self {
        Self { dir, bundle, states: BTreeMap::new() }
    }

    /// Verifies every presented SVID at `now`. Returns the bindings in force and the identity
    /// events (bound, rotated, rejected, revoked) for workloads whose state changed.
    pub fn rescan(&mut self, matcher: &SpiffeMatcher, now: SystemTime) -> (Vec<Bound>, Vec<Value>) {
        let presentations = match svid::scan(&self.dir, &self.bundle, now) {
            Ok(presentations) => presentations,
            Err(err) => {
                // An unreadable directory revokes nothing silently: it is logged every scan, and
                // the bindings stay as they are until the directory is readable again.
                tracing::warn!(dir = %self.dir.display(), error = %format!("{err:#}"), "cannot read the SVID directory");
                let bound = self.states.values().filter_map(|s| match s {
                    State::Bound(b) => Some(b.clone()),
                    State::Rejected { .. } => None,
                });
                return (bound.collect(), Vec::new());
            }
        };
        let mut states = BTreeMap::new();
        let mut events = Vec::new();
        for p in presentations {
            let state = judge(&p, matcher);
            if let Some(event) = transition(&p.workload, self.states.get(&p.workload), &state) {
                events.push(event);
            }
            states.insert(p.workload, state);
        }
        for (workload, old) in &self.states {
            if !states.contains_key(workload) {
                if let State::Bound(b) = old {
                    events.push(identity_event(workload, "revoked", "removed", "the workload's directory is gone", Some(b)));
                }
            }
        }
        self.states = states;
        let bound = self
            .states
            .values()
            .filter_map(|s| match s {
                State::Bound(b) => Some(b.clone()),
                State::Rejected { .. } => None,
            })
            .collect();
        (bound, events)
    }
}

fn judge(p: &Presentation, matcher: &SpiffeMatcher) -> State {
    let rejected = |reason: &str, detail: String| State::Rejected { reason: reason.to_owned(), detail };
    let svid = match &p.svid {
        Ok(svid) => svid,
        Err(err) => return rejected(err.kind(), err.to_string()),
    };
    let binding = match &p.binding {
        Ok(binding) => binding,
        Err(err) => return rejected("bad-binding", err.clone()),
    };
    let Some(identity) = matcher.identity_of(&svid.spiffe_id) else {
        return rejected("no-identity", format!("no identity selects {}", svid.spiffe_id));
    };
    State::Bound(Bound {
        identity,
        spiffe_id: svid.spiffe_id.clone(),
        addresses: binding.addresses.clone(),
        cgroup: binding.cgroup.clone(),
        not_after: svid.not_after,
        fingerprint: svid.fingerprint,
    })
}

/// The identity event for a state change, if it is one.
fn transition(workload: &str, old: Option<&State>, new: &State) -> Option<Value> {
    match (old, new) {
        (Some(old), new) if old == new => None,
        (Some(State::Bound(old)), State::Bound(new)) if old.identity == new.identity && old.addresses == new.addresses && old.cgroup == new.cgroup => {
            Some(identity_event(workload, "rotated", "renewed", "a new certificate replaced the old one", Some(new)))
        }
        (_, State::Bound(new)) => Some(identity_event(workload, "bound", "verified", "", Some(new))),
        (Some(State::Bound(old)), State::Rejected { reason, detail }) => {
            Some(identity_event(workload, "revoked", reason, detail, Some(old)))
        }
        (_, State::Rejected { reason, detail }) => Some(identity_event(workload, "rejected", reason, detail, None)),
    }
}

fn identity_event(workload: &str, result: &str, reason: &str, detail: &str, bound: Option<&Bound>) -> Value {
    let mut event = json!({
        "kind": "identity",
        "source": "certificate",
        "workload": workload,
        "result": result,
        "reason": reason,
    });
    if !detail.is_empty() {
        event["detail"] = detail.into();
    }
    if let Some(b) = bound {
        event["spiffe_id"] = b.spiffe_id.clone().into();
        event["identity_id"] = b.identity.into();
        event["addresses"] = b.addresses.iter().map(ToString::to_string).collect::<Vec<_>>().into();
        event["cgroup"] = b.cgroup.clone().into();
        event["not_after"] = humantime::format_rfc3339_seconds(b.not_after).to_string().into();
    }
    event
}
