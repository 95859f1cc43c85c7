//! The agent state everything reads: the datapath, the policies in force and the sinks, shared by
//! the admin socket, the reloads, the identity sources, the event reader and the metrics.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{datapath::Datapath, events::fanout::Sinks, policy::compile::Compiled};

/// What the server, the reloads and the identity sources share. Lock order: `datapath`, then
/// the identity sources, then `policies`.
pub struct Shared {
    pub datapath: Mutex<Datapath>,
    pub policies: Arc<Mutex<Policies>>,
    pub sinks: Arc<Sinks>,
}

/// Compiled policies of recent generations, to name the rules and identities of flow events
/// that were queued before a switch.
const KEPT_GENERATIONS: usize = 8;

/// The policy in force and the reload counters.
pub struct Policies {
    /// (generation, compiled policy) of recent generations, oldest first.
    generations: VecDeque<(u32, Arc<Compiled>)>,
    in_force: u32,
    /// Reloads applied since the agent started.
    pub reloads: u64,
    /// Reloads rejected since the agent started.
    pub rejected: u64,
    /// The errors of the last rejected reload, one per line.
    pub last_rejection: Option<String>,
    /// How long the policy in force took from reading its files to being in force.
    pub last_apply: Option<Duration>,
}

impl Policies {
    pub fn new(generation: u32, compiled: Arc<Compiled>) -> Self {
        Self {
            generations: VecDeque::from([(generation, compiled)]),
            in_force: generation,
            reloads: 0,
            rejected: 0,
            last_rejection: None,
            last_apply: None,
        }
    }

    /// The generation in force, as this agent last switched or adopted it.
    pub fn generation(&self) -> u32 {
        self.in_force
    }

    /// The policy in force.
    pub fn current(&self) -> &Arc<Compiled> {
        self.find(self.in_force).expect("the generation in force is kept")
    }

    /// The policy of `generation`, or the one in force if that generation is long gone.
    pub fn of_generation(&self, generation: u32) -> &Arc<Compiled> {
        self.find(generation).unwrap_or_else(|| self.current())
    }

    fn find(&self, generation: u32) -> Option<&Arc<Compiled>> {
        self.generations.iter().rev().find(|(g, _)| *g == generation).map(|(_, c)| c)
    }

    /// Announces the policy of a generation about to come into force.
    pub(crate) fn announce(&mut self, generation: u32, compiled: Arc<Compiled>) {
        self.generations.retain(|(g, _)| *g != generation);
        self.generations.push_back((generation, compiled));
        while self.generations.len() > KEPT_GENERATIONS && self.generations.front().is_some_and(|(g, _)| *g != self.in_force) {
            self.generations.pop_front();
        }
    }

    pub(crate) fn activate(&mut self, generation: u32) {
        self.in_force = generation;
        self.reloads += 1;
    }

    /// Forgets an announced generation that never came into force.
    pub(crate) fn withdraw(&mut self, generation: u32) {
        if generation != self.in_force {
            self.generations.retain(|(g, _)| *g != generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;

    fn compiled(port: u16) -> Arc<Compiled> {
        let text = format!(
            "apiVersion: zt/v1\nkind: Identity\nmetadata: {{name: web}}\nspec: {{selectors: [{{cidr: 10.0.0.0/8}}]}}\n---\n\
             apiVersion: zt/v1\nkind: Policy\nmetadata: {{name: web}}\n\
             spec: {{subject: [web], ingress: [{{from: [any], ports: [{{protocol: tcp, port: {port}}}]}}]}}\n"
        );
        Arc::new(policy::compile::compile(&policy::parse_str(&text, "p.yaml").unwrap()).unwrap())
    }

    #[test]
    fn events_are_named_by_the_policy_of_their_generation() {
        let (first, second, third) = (compiled(1), compiled(2), compiled(3));
        let mut policies = Policies::new(1, first.clone());
        policies.announce(2, second.clone());
        assert!(Arc::ptr_eq(policies.current(), &first), "announced is not in force");
        assert!(Arc::ptr_eq(policies.of_generation(2), &second), "but its events can be named");
        policies.activate(2);
        assert!(Arc::ptr_eq(policies.current(), &second));
        assert!(Arc::ptr_eq(policies.of_generation(1), &first), "events queued before the switch");
        assert_eq!(policies.reloads, 1);
        policies.announce(3, third);
        policies.withdraw(3);
        assert!(Arc::ptr_eq(policies.of_generation(3), &second), "a withdrawn generation falls back to the current");
        for generation in 3..20 {
            policies.announce(generation, compiled(generation as u16));
            policies.activate(generation);
        }
        assert_eq!(policies.generations.len(), KEPT_GENERATIONS);
        assert!(Arc::ptr_eq(policies.of_generation(1), policies.current()), "old generations are forgotten");
    }
}
