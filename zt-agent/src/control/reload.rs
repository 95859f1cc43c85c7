//! Hot reload: on SIGHUP, or when a file of the policy set changes, the agent loads and compiles
//! the set again and, if it is valid, installs it aside and switches to it atomically
//! (`Datapath::stage` / `switch`). An invalid set is rejected with its `file:line:col` errors and
//! changes nothing: the policy in force stays in force. Each outcome is logged, counted (`status`)
//! and reported as a `"kind": "policy"` event to the sinks.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use inotify::{EventMask, Inotify, WatchMask};
use serde_json::{json, Value};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, Signal, SignalKind},
    sync::mpsc,
};

use crate::{events::record, identity::sources::IdentitySources, policy, policy::compile::Compiled, state::Shared};

/// Changes to policy files closer together than this make one reload: an editor's or a
/// deployment's burst of writes and renames is loaded once, when it is over.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// What started a reload, as the `trigger` of its event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChange,
    /// The cluster's label sets or namespaces changed (the Kubernetes source).
    ClusterChange,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file-change",
            Trigger::ClusterChange => "cluster-change",
        }
    }
}

pub struct Reloader {
    paths: Vec<PathBuf>,
    node: String,
    shared: Arc<Shared>,
    sources: Arc<Mutex<IdentitySources>>,
}

impl Reloader {
    pub fn new(paths: Vec<PathBuf>, node: String, shared: Arc<Shared>, sources: Arc<Mutex<IdentitySources>>) -> Self {
        Self { paths, node, shared, sources }
    }

    /// One reload attempt, start to finish (blocking: it reads files and waits for the kernel).
    /// Never fails: a reload that cannot be applied is reported and leaves the policy in force.
    pub fn reload(&self, trigger: Trigger) -> Result<()> {
        let started = Instant::now();
        let mut phases = Phases::default();
        let cluster = self.sources.lock().expect("sources lock poisoned").cluster();
        let compiled = phases
            .time("load", || policy::load_paths(&self.paths))
            .map_err(|errors| errors.0.iter().map(ToString::to_string).collect::<Vec<_>>())
            .and_then(|set| {
                phases.time("compile", || policy::compile::compile_for(&set, &cluster)).map_err(|err| vec![err.to_string()])
            });
        let in_force = self.shared.policies.lock().expect("policies lock poisoned").current().clone();
        if compiled.as_ref().is_ok_and(|compiled| *compiled == *in_force) {
            // Nothing to switch: editors and config managers rewrite files with the same content.
            let generation = self.shared.datapath.lock().expect("datapath lock poisoned").config().map_or(0, |c| c.generation);
            tracing::info!(generation, trigger = trigger.name(), "policy unchanged; nothing to reload");
            self.write_event(trigger, "unchanged", generation, &[]);
            return Ok(());
        }
        let outcome = match compiled {
            Ok(compiled) => self.apply(Arc::new(compiled), &mut phases),
            Err(errors) => Err(errors),
        };
        match outcome {
            Ok((generation, compiled, identity_events)) => {
                let reloads = {
                    let mut policies = self.shared.policies.lock().expect("policies lock poisoned");
                    policies.last_apply = Some(started.elapsed());
                    policies.reloads
                };
                tracing::info!(
                    generation,
                    trigger = trigger.name(),
                    identities = compiled.identities.len(),
                    rules = compiled.rules.len(),
                    entries = compiled.policy.len(),
                    reloads,
                    phases = %phases,
                    "policy reloaded"
                );
                self.write_event_with(trigger, "applied", generation, &[], &phases);
                for event in identity_events {
                    self.shared.sinks.publish(record::agent_event(&self.node, event));
                }
            }
            Err(errors) => {
                let generation = self.shared.datapath.lock().expect("datapath lock poisoned").config().map_or(0, |c| c.generation);
                {
                    let mut policies = self.shared.policies.lock().expect("policies lock poisoned");
                    policies.rejected += 1;
                    policies.last_rejection = Some(errors.join("\n"));
                }
                for error in &errors {
                    tracing::error!(trigger = trigger.name(), generation, "policy reload rejected: {error}");
                }
                tracing::warn!(generation, "the policy in force is unchanged");
                self.write_event(trigger, "rejected", generation, &errors);
            }
        }
        Ok(())
    }

    /// Stages `compiled` and the certificate bindings under it, then switches. Returns the new
    /// generation and the identity events, or the errors that left the old policy in force.
    #[allow(clippy::type_complexity)]
    fn apply(&self, compiled: Arc<Compiled>, phases: &mut Phases) -> Result<(u32, Arc<Compiled>, Vec<Value>), Vec<String>> {
        let mut datapath = self.shared.datapath.lock().expect("datapath lock poisoned");
        let mut sources = self.sources.lock().expect("sources lock poisoned");
        let kernel_error = |err: anyhow::Error| vec![format!("{err:#}")];
        let in_force = datapath.config().map_err(kernel_error)?.generation;
        // The enricher must know the new generation's rules before its first event.
        let next = in_force.wrapping_add(1).max(1);
        self.shared.policies.lock().expect("policies lock poisoned").announce(next, compiled.clone());
        let staged = phases
            .time("stage", || datapath.stage(&compiled).and_then(|()| sources.stage(compiled.clone(), &mut datapath)))
            .and_then(|events| Ok((phases.time("switch", || datapath.switch())?, events)));
        let (generation, mut events) = match staged {
            Ok(switched) => switched,
            Err(err) => {
                sources.unstage();
                if let Err(discard) = datapath.discard_staged() {
                    tracing::warn!(error = %format!("{discard:#}"), "could not empty the staged slot; the next reload will");
                }
                self.shared.policies.lock().expect("policies lock poisoned").withdraw(next);
                return Err(kernel_error(err.context("installing the policy in the kernel")));
            }
        };
        self.shared.policies.lock().expect("policies lock poisoned").activate(generation);
        // The new generation is in force; cgroups and interfaces follow its selectors now.
        match sources.switched(&mut datapath) {
            Ok(more) => events.extend(more),
            Err(err) => tracing::error!(error = %format!("{err:#}"), "identity sources not updated after the reload; retrying on the next refresh"),
        }
        Ok((generation, compiled, events))
    }

    fn write_event(&self, trigger: Trigger, result: &str, generation: u32, errors: &[String]) {
        self.write_event_with(trigger, result, generation, errors, &Phases::default());
    }

    fn write_event_with(&self, trigger: Trigger, result: &str, generation: u32, errors: &[String], phases: &Phases) {
        let mut event = json!({
            "kind": "policy",
            "result": result,
            "trigger": trigger.name(),
            "generation": generation,
            "errors": errors,
        });
        if !phases.0.is_empty() {
            // Milliseconds to the microsecond: what a reader compares, without float noise.
            let ms = |took: &Duration| json!(took.as_micros() as f64 / 1e3);
            event["phases_ms"] = phases.0.iter().map(|(name, took)| (name.to_string(), ms(took))).collect();
        }
        self.shared.sinks.publish(record::agent_event(&self.node, event));
    }
}

/// How long each phase of a reload took: reading and parsing the files (`load`), `compile`,
/// `stage` (writing the slot not in force) and `switch` (the config write, the grace period and
/// emptying the old slot). In the log and the `applied` event, so an operator sees what a
/// large policy costs where.
#[derive(Default)]
struct Phases(Vec<(&'static str, Duration)>);

impl Phases {
    fn time<T>(&mut self, name: &'static str, phase: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = phase();
        self.0.push((name, started.elapsed()));
        result
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(name, took)| format!("{name} {:.0} ms", took.as_secs_f64() * 1e3)).collect();
        f.write_str(&parts.join(", "))
    }
}

/// What starts a reload, set up before the agent first reads its policy: a change after that
/// read, or a SIGHUP, is then never missed, however long the agent takes to be ready.
pub struct Triggers {
    hangup: Signal,
    watcher: Watcher,
}

/// Watches `paths` (the `--policy` files and directories) and SIGHUP.
pub fn triggers(paths: &[PathBuf]) -> Result<Triggers> {
    let hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    Ok(Triggers { hangup, watcher: watch(paths)? })
}

/// Reloads on SIGHUP and, debounced, on changes to the policy files and to the cluster, until
/// an error.
pub async fn run(reloader: Arc<Reloader>, triggers: Triggers, cluster_changed: Arc<tokio::sync::Notify>) -> Result<()> {
    let Triggers { mut hangup, watcher } = triggers;
    let (changed_tx, mut changed) = mpsc::channel(16);
    let mut watching = tokio::spawn(forward_changes(watcher, changed_tx));
    loop {
        let trigger = tokio::select! {
            _ = hangup.recv() => Trigger::Signal,
            Some(()) = changed.recv() => {
                // Wait for the burst of changes to end.
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, changed.recv()).await {}
                Trigger::FileChange
            }
            () = cluster_changed.notified() => {
                // Pods come in bursts (a rollout, a scale-up): one reload for the burst.
                tokio::time::sleep(DEBOUNCE).await;
                Trigger::ClusterChange
            }
            result = &mut watching => {
                return result.context("the policy file watcher panicked")?.context("watching the policy files");
            }
        };
        let reloader = reloader.clone();
        tokio::task::spawn_blocking(move || reloader.reload(trigger)).await.context("the reload panicked")??;
    }
}

/// What to watch: the directories holding the policy set, and in each, which names matter.
enum Watched {
    /// A `--policy` directory: its `*.yaml` and `*.yml` files.
    Directory,
    /// The parent directory of a `--policy` file: that file (watched through its directory, so
    /// a file replaced by a rename, or created later, is seen).
    File(std::ffi::OsString),
}

struct Watcher {
    inotify: Inotify,
    watches: Vec<(inotify::WatchDescriptor, Watched)>,
}

fn watch(paths: &[PathBuf]) -> Result<Watcher> {
    let inotify = Inotify::init().context("inotify_init")?;
    let mask = WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM | WatchMask::DELETE;
    let mut watches = Vec::new();
    for path in paths {
        let (dir, watched) = match path.is_dir() {
            true => (path.clone(), Watched::Directory),
            false => {
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let name = path.file_name().with_context(|| format!("{} names no file", path.display()))?;
                (parent.to_owned(), Watched::File(name.to_owned()))
            }
        };
        let wd = inotify.watches().add(&dir, mask).with_context(|| format!("watching {}", dir.display()))?;
        tracing::debug!(dir = %dir.display(), "watching for policy changes");
        watches.push((wd, watched));
    }
    Ok(Watcher { inotify, watches })
}

impl Watcher {
    fn concerns(&self, wd: &inotify::WatchDescriptor, mask: EventMask, name: Option<&OsStr>) -> bool {
        if mask.contains(EventMask::Q_OVERFLOW) {
            return true; // events were lost: reload to be sure
        }
        let Some(name) = name else { return false };
        // A Kubernetes ConfigMap volume swaps all its files at once by renaming its `..data`
        // symlink; the file names themselves are symlinks through it and never change.
        if name == "..data" {
            return self.watches.iter().any(|(w, _)| w == wd);
        }
        self.watches.iter().filter(|(w, _)| w == wd).any(|(_, watched)| match watched {
            Watched::File(file) => name == file,
            Watched::Directory => {
                let ext = Path::new(name).extension().and_then(OsStr::to_str);
                matches!(ext, Some("yaml" | "yml"))
            }
        })
    }
}

async fn forward_changes(watcher: Watcher, changed: mpsc::Sender<()>) -> Result<()> {
    // SAFETY: the watcher owns the inotify fd and keeps it open for as long as the AsyncFd lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(watcher, Interest::READABLE) }.context("polling inotify")?;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let mut guard = fd.readable_mut().await?;
        let watcher = guard.get_inner_mut();
        let relevant = match watcher.inotify.read_events(&mut buffer) {
            Ok(events) => {
                let mut relevant = false;
                for event in events {
                    relevant |= watcher.concerns(&event.wd, event.mask, event.name);
                }
                relevant
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                guard.clear_ready();
                continue;
            }
            Err(err) => return Err(err).context("reading inotify events"),
        };
        if relevant && changed.send(()).await.is_err() {
            return Ok(());
        }
    }
}

impl std::os::fd::AsRawFd for Watcher {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inotify.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_to_the_policy_files_concern_the_watcher() {
        let dir = tempfile::tempdir().unwrap();
        let policies_dir = dir.path().join("policies");
        std::fs::create_dir(&policies_dir).unwrap();
        let file = dir.path().join("main.yaml");
        let watcher = watch(&[policies_dir, file]).unwrap();
        let (in_dir, beside_file) = (&watcher.watches[0].0, &watcher.watches[1].0);
        let concerns = |wd, name: &str| watcher.concerns(wd, EventMask::CLOSE_WRITE, Some(OsStr::new(name)));
        assert!(concerns(in_dir, "a.yaml") && concerns(in_dir, "b.yml"));
        assert!(!concerns(in_dir, "a.yaml.swp") && !concerns(in_dir, ".a.yaml.new") && !concerns(in_dir, "README"));
        assert!(concerns(beside_file, "main.yaml"));
        assert!(!concerns(beside_file, "other.yaml") && !concerns(beside_file, "main.yaml.new"));
        assert!(!watcher.concerns(in_dir, EventMask::DELETE_SELF, None));
        assert!(watcher.concerns(in_dir, EventMask::Q_OVERFLOW, None), "lost events: reload to be sure");
    }
}
