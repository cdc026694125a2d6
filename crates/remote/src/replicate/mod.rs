//! Replication: a thread that ships every committed epoch of a local store
//! to its remote store, in order, after the local commit, and keeps the
//! remote store a mirror of the local one as reclamation merges, folds and
//! deletes epochs.
//!
//! One pass: list the local epochs (their headers), keep
//! those whose chain is whole (a reclamation half done is seen at the next
//! pass), upload the ones the remote store lacks in id order (each opened
//! at its turn and sent from that descriptor only if it still is the
//! version listed, whatever reclamation does to the name), write
//! MANIFEST naming exactly them, and only then delete the objects no
//! longer named. A crash at any instant leaves MANIFEST naming objects
//! that are all there.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use store::format::{HEADER_SIZE, Header};

use crate::client::Client;
use crate::error::{RemoteError, Result, io};
use crate::manifest::{Entry, Manifest, object_name};

mod merged;

/// While a pass uploads a backlog, a manifest naming what is up so far is
/// written at most this often (each is one small PUT).
const INTERIM_MANIFEST: Duration = Duration::from_secs(1);

/// Replication is behind when at least [`BEHIND_EPOCHS`] new epochs wait
/// to go up, they span this much capture time or more, and the backlog
/// lasts: uploading it would take more than half the capture time it
/// spans at the recent upload rate (the object store cannot keep up), or
/// its oldest epoch has waited [`LAG_BOUND`]. It then ships the newest
/// state merged onto what the remote store holds (one object for the run
/// of epochs), so the remote store's granularity becomes coarser instead
/// of its lag longer.
const COARSE: Duration = Duration::from_secs(1);

/// A backlog this old is shipped merged whatever the upload rate (after a
/// network cut, say): the recovery point comes first, the epochs merged
/// over go up once replication has caught up (see [`Worker::covered`]).
const LAG_BOUND: Duration = Duration::from_secs(5);

/// Uploads the recent upload rate is measured over.
const RATE_SAMPLES: usize = 16;

/// With epochs a second or more apart, two or three waiting are the normal
/// jitter of a pass, not a store that cannot keep up: merging them would
/// thin out the remote store's 1 s tier for nothing.
const BEHIND_EPOCHS: usize = 4;

/// The longest chain a version kept remotely may have (a restore from the
/// object store reads that many objects at most): beyond it the local
/// version, which local folding keeps short, goes up instead.
const MAX_REMOTE_CHAIN: usize = store::DEFAULT_MAX_CHAIN;

/// What the replication has done so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaStatus {
    /// The remote store.
    pub url: String,
    /// The newest epoch off-host and its capture time (Unix ns): the
    /// recovery point if this host is lost now.
    pub newest_id: Option<u64>,
    pub newest_created_ns: Option<u64>,
    /// Epochs the remote store holds.
    pub remote_epochs: u64,
    /// Median capture-time step between the newest remote epochs, ns.
    pub remote_step_ns: Option<u64>,
    /// Epochs and bytes committed locally and not yet off-host, at the
    /// last pass.
    pub backlog_epochs: u64,
    pub backlog_bytes: u64,
    /// Merged epochs shipped because replication had fallen behind, and
    /// the local epochs that such epochs stand for now (local only).
    pub merged_uploads: u64,
    pub covered_epochs: u64,
    /// Totals: objects and bytes uploaded, objects deleted, manifests written.
    pub uploaded_objects: u64,
    pub uploaded_bytes: u64,
    pub deleted_objects: u64,
    pub manifests: u64,
    /// Time spent uploading, seconds.
    pub upload_s: f64,
    /// The last error, if the last pass failed (the replicator retries).
    pub last_error: Option<String>,
    /// The backlog is over its limit now, and for how long it was in all.
    pub over_limit: bool,
    pub over_limit_s: f64,
    /// The limit and its policy.
    pub limit: Option<BacklogLimit>,
}

struct Control {
    wake: bool,
    stopping: bool,
    status: ReplicaStatus,
    /// Since when the backlog is over the limit.
    over_since: Option<Instant>,
}

/// How far replication may fall behind, and what happens then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogLimit {
    /// Bytes committed locally and not off-host.
    pub bytes: u64,
    /// Over it, snapshots wait until replication catches up (the interval
    /// stretches); otherwise they go on locally and the report says for
    /// how long the limit was exceeded.
    pub throttle: bool,
}

/// What the replication thread and its owner share: the control state and its
/// condition variable.
struct Mailbox {
    control: Mutex<Control>,
    cv: Condvar,
}

/// The replication thread of one local store.
pub struct Replicator {
    shared: Arc<Mailbox>,
    thread: Option<JoinHandle<()>>,
}

/// A local epoch file, listed.
struct Local {
    id: u64,
    parent: Option<u64>,
    created_ns: u64,
    bytes: u64,
    object: String,
    /// Identity of the file listed: (inode, size, mtime ns).
    stat: (u64, u64, i64),
}

/// The thread's own state.
struct Worker {
    dir: PathBuf,
    client: Client,
    uuid: [u8; 16],
    /// What the remote MANIFEST says now.
    manifest: Manifest,
    /// Objects found on the remote store that no manifest names (uploads
    /// cut short by a crash): deleted after the next manifest.
    strays: BTreeSet<String>,
    /// Listed local files by id.
    listed: HashMap<u64, Local>,
    /// How often to look for new epochs without being told.
    poll: Duration,
    limit: BacklogLimit,
    /// The local store, read to write merged epochs.
    store: store::Store,
    /// Local epochs a merged epoch shipped instead of them stands for:
    /// they stay local only while replication is behind. Once it has
    /// caught up, those the retention policy keeps past its finest tier go
    /// up, so that the remote store's coarser tiers are as whole as the
    /// local ones.
    /// (By id, with the object of the local version then: a version the
    /// local reclamation rewrote since, merging younger epochs into it,
    /// is one its policy keeps for longer, and goes up.)
    covered: BTreeMap<u64, String>,
    /// The local store's retention policy.
    policy: store::Policy,
    /// The last uploads: (bytes, seconds).
    recent: VecDeque<(u64, f64)>,
    /// Objects uploaded that no manifest has named yet: if a failed pass
    /// leaves one unnamed, it is deleted after the next manifest.
    unnamed: BTreeSet<String>,
}

impl Replicator {
    /// Start replicating the store in `dir` to `client`'s remote store,
    /// looking for new epochs every `poll` (and at [`Replicator::notify`]).
    /// Refuses a remote store that belongs to another store. `policy` is
    /// the local store's retention policy.
    pub fn start(
        dir: &Path,
        client: Client,
        poll: Duration,
        limit: BacklogLimit,
        policy: store::Policy,
    ) -> Result<Replicator> {
        let local = store::Store::open(dir, store::Access::Read).map_err(Box::new)?;
        let uuid = local.uuid();
        let url = client.url().to_string();
        let manifest = match client.get("MANIFEST")? {
            Some(text) => {
                let m = Manifest::decode(&text).map_err(|source| RemoteError::DamagedManifest {
                    url: url.clone(),
                    source,
                })?;
                crate::fetch::check_key(&client, &m)?;
                if m.store_uuid != uuid {
                    return Err(RemoteError::BadManifest {
                        url,
                        why: format!(
                            "it belongs to another store ({}), not to {}: replicate to another prefix",
                            hex(&m.store_uuid),
                            dir.display()
                        ),
                    });
                }
                m
            }
            None => Manifest {
                store_uuid: uuid,
                generation: 0,
                key_id: client.key().map(crate::SealKey::id),
                epochs: Vec::new(),
            },
        };
        let store_file = dir.join("STORE");
        let bytes = std::fs::read(&store_file).map_err(io("read", &store_file))?;
        client.put("STORE", bytes)?;
        let named: BTreeSet<&str> = manifest.epochs.iter().map(|e| e.object.as_str()).collect();
        let strays = client
            .list("epochs")?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !named.contains(n.as_str()))
            .collect();
        let status = ReplicaStatus {
            url,
            limit: Some(limit),
            ..ReplicaStatus::default()
        };
        let shared = Arc::new(Mailbox {
            control: Mutex::new(Control {
                wake: true,
                stopping: false,
                status,
                over_since: None,
            }),
            cv: Condvar::new(),
        });
        let mut w = Worker {
            dir: dir.to_path_buf(),
            client,
            uuid,
            manifest,
            strays,
            listed: HashMap::new(),
            poll,
            limit,
            store: local,
            covered: BTreeMap::new(),
            policy,
            recent: VecDeque::new(),
            unnamed: BTreeSet::new(),
        };
        w.note(&shared, None);
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("replicate".into())
            .spawn(move || w.run(&sh))
            .map_err(|e| RemoteError::Io {
                what: "start the replication thread for",
                path: dir.to_path_buf(),
                source: e,
            })?;
        Ok(Replicator {
            shared,
            thread: Some(thread),
        })
    }

    /// An epoch was committed or reclaimed: look again.
    pub fn notify(&self) {
        let mut c = self.shared.control.lock().unwrap_or_else(|p| p.into_inner());
        c.wake = true;
        self.shared.cv.notify_all();
    }

    /// A handle that reads the status from elsewhere (the control API).
    pub fn watch(&self) -> ReplicaWatch {
        ReplicaWatch(self.shared.clone())
    }

    /// What it has done so far.
    pub fn status(&self) -> ReplicaStatus {
        self.shared
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .clone()
    }

    /// Ship what is left, for at most `grace`, then stop.
    pub fn finish(mut self, grace: Duration) -> ReplicaStatus {
        self.stop(grace);
        self.status()
    }

    fn stop(&mut self, grace: Duration) {
        {
            let mut c = self.shared.control.lock().unwrap_or_else(|p| p.into_inner());
            c.stopping = true;
            c.wake = true;
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let until = Instant::now() + grace;
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("replication did not finish within {grace:?}; the remote store keeps its last manifest");
            }
        }
    }
}

/// Reads a replicator's status; see [`Replicator::watch`].
#[derive(Clone)]
pub struct ReplicaWatch(Arc<Mailbox>);

impl std::fmt::Debug for ReplicaWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaWatch")
    }
}

impl ReplicaWatch {
    /// Snapshots must wait: the backlog is over its limit, whose policy
    /// is to throttle.
    pub fn hold(&self) -> bool {
        let c = self.0.control.lock().unwrap_or_else(|p| p.into_inner());
        c.status.over_limit && c.status.limit.is_some_and(|l| l.throttle)
    }

    /// What the replicator has done so far.
    pub fn status(&self) -> ReplicaStatus {
        self.0.control.lock().unwrap_or_else(|p| p.into_inner()).status.clone()
    }

    /// The newest epoch the remote store's manifest names.
    pub fn newest(&self) -> Option<u64> {
        self.0
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .newest_id
    }

    /// Look for new epochs now (something waits for them to be off-host).
    pub fn notify(&self) {
        let mut c = self.0.control.lock().unwrap_or_else(|p| p.into_inner());
        c.wake = true;
        self.0.cv.notify_all();
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Worker {
    fn run(&mut self, shared: &Mailbox) {
        let mut failures = 0u32;
        loop {
            let stopping = {
                let mut c = shared.control.lock().unwrap_or_else(|p| p.into_inner());
                // After a failure, retry within a second even without news.
                let wait = if failures > 0 {
                    Duration::from_millis(200 << failures.min(3))
                } else {
                    self.poll
                };
                if !c.wake && !c.stopping {
                    c = shared
                        .cv
                        .wait_timeout(c, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                c.wake = false;
                c.stopping
            };
            match self.pass(shared) {
                Ok(settled) => {
                    failures = 0;
                    self.note(shared, None);
                    if stopping && settled {
                        return;
                    }
                    if !settled {
                        // A reclamation was half done: look again shortly.
                        std::thread::sleep(Duration::from_millis(20));
                        shared.control.lock().unwrap_or_else(|p| p.into_inner()).wake = true;
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!("replication: {e}");
                    self.note(shared, Some(e.to_string()));
                    if stopping && failures >= 3 {
                        return;
                    }
                }
            }
        }
    }

    /// Record the status.
    fn note(&self, shared: &Mailbox, error: Option<String>) {
        self.note_backlog(shared);
        shared
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .last_error = error;
    }

    /// Record what is off-host and the backlog, and whether it is over the limit.
    fn note_backlog(&self, shared: &Mailbox) {
        let mut c = shared.control.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut c.status;
        let newest = self.manifest.epochs.last();
        s.newest_id = newest.map(|e| e.id);
        s.newest_created_ns = newest.map(|e| e.created_ns);
        s.remote_epochs = self.manifest.epochs.len() as u64;
        let newest: Vec<u64> = self
            .manifest
            .epochs
            .iter()
            .rev()
            .take(11)
            .map(|e| e.created_ns)
            .collect();
        let mut steps: Vec<u64> = newest.windows(2).map(|w| w[0].saturating_sub(w[1])).collect();
        steps.sort_unstable();
        s.remote_step_ns = steps.get(steps.len() / 2).copied();
        // An epoch whose id is up, in this or another version, is off-host:
        // every version restores to the same state.
        let up_ids: BTreeSet<u64> = self.manifest.epochs.iter().map(|e| e.id).collect();
        let behind: Vec<&Local> = self
            .listed
            .values()
            .filter(|l| !up_ids.contains(&l.id) && !self.covered.contains_key(&l.id))
            .collect();
        s.covered_epochs = self.covered.len() as u64;
        s.backlog_epochs = behind.len() as u64;
        s.backlog_bytes = behind.iter().map(|l| l.bytes).sum();
        let over = s.backlog_bytes > self.limit.bytes;
        let now = Instant::now();
        if let Some(since) = c.over_since.take() {
            c.status.over_limit_s += now.duration_since(since).as_secs_f64();
        }
        if over {
            if !c.status.over_limit {
                tracing::warn!(
                    backlog = c.status.backlog_bytes,
                    limit = self.limit.bytes,
                    "replication is behind by more than --replicate-backlog: {}",
                    if self.limit.throttle {
                        "snapshots wait until it catches up"
                    } else {
                        "snapshots go on locally"
                    }
                );
            }
            c.over_since = Some(now);
        }
        c.status.over_limit = over;
    }

    /// List the local epochs, reading the header of each new or changed file.
    fn scan(&mut self) -> Result<()> {
        let epochs = self.dir.join("epochs");
        let mut seen = BTreeSet::new();
        for ent in std::fs::read_dir(&epochs).map_err(io("list", &epochs))? {
            let ent = ent.map_err(io("list", &epochs))?;
            let name = ent.file_name();
            let Some(id) = name.to_str().and_then(store::epoch_id_of) else {
                continue;
            };
            let path = ent.path();
            let Ok(md) = std::fs::metadata(&path) else {
                continue; // removed meanwhile
            };
            seen.insert(id);
            if self.listed.get(&id).is_some_and(|l| l.stat == stat_of(&md)) {
                continue;
            }
            let Some((file, local)) = open_epoch(&path, id)? else {
                continue;
            };
            drop(file);
            self.listed.insert(id, local);
        }
        self.listed.retain(|id, _| seen.contains(id));
        Ok(())
    }

    /// One pass; `Ok(false)` if some local epoch was left out because its
    /// chain was not whole (a reclamation in progress).
    fn pass(&mut self, shared: &Mailbox) -> Result<bool> {
        self.scan()?;
        self.note_backlog(shared);
        // Epochs whose chain is whole, in id order.
        let mut settled = true;
        let mut next: Vec<Entry> = Vec::new();
        for l in self.listed.values() {
            let mut cur = l;
            let whole = loop {
                match cur.parent {
                    None => break true,
                    Some(p) => match self.listed.get(&p) {
                        Some(q) if p < cur.id => cur = q,
                        _ => break false,
                    },
                }
            };
            if whole {
                next.push(Entry {
                    id: l.id,
                    parent: l.parent,
                    created_ns: l.created_ns,
                    bytes: l.bytes,
                    object: l.object.clone(),
                });
            } else {
                settled = false;
            }
        }
        next.sort_by_key(|e| e.id);
        // Covered while the local version is the one covered: an epoch the
        // local reclamation rewrote since (merging its younger neighbours
        // into it) is one a coarser tier keeps, and goes up.
        self.covered
            .retain(|id, object| self.listed.get(id).is_some_and(|l| &l.object == object));
        // What the remote store keeps: whatever version of a local epoch it
        // holds (every version of an id restores to the same state, so a
        // local merge or fold need not go up again) while that version's
        // remote chain is whole and at most MAX_REMOTE_CHAIN long; each
        // with the length of its remote chain.
        let remote: HashMap<u64, &Entry> = self.manifest.epochs.iter().map(|e| (e.id, e)).collect();
        let mut kept: Kept = BTreeMap::new();
        let mut pending: Vec<Entry> = Vec::new();
        for e in &next {
            match remote.get(&e.id).and_then(|r| Some((r, chain_depth(&kept, r.parent)?))) {
                Some((r, d)) => {
                    kept.insert(e.id, ((*r).clone(), d));
                }
                None if self.covered.contains_key(&e.id) => {}
                None => pending.push(e.clone()),
            }
        }
        // An epoch named remotely is not local only.
        self.covered.retain(|id, _| !kept.contains_key(id));
        // A covered epoch stays local only while a newer epoch goes up or
        // is up (after a failed pass the merged epoch may not be named).
        let newest_up = kept.keys().chain(pending.iter().map(|e| &e.id)).max().copied();
        let orphaned: Vec<u64> = self
            .covered
            .keys()
            .copied()
            .filter(|&c| newest_up.is_none_or(|n| n < c))
            .collect();
        if !orphaned.is_empty() {
            for c in &orphaned {
                self.covered.remove(c);
            }
            return Ok(false);
        }
        let named: BTreeSet<String> = self.manifest.epochs.iter().map(|e| e.object.clone()).collect();
        // Behind by a coarse step or more (the epochs newer than what is up
        // span that much): ship the newest state, merged onto what the
        // remote store keeps, instead of every epoch. Older epochs that
        // must go up again wait until replication has caught up.
        let newest_kept = kept.keys().next_back().copied().unwrap_or(0);
        let fresh: Vec<&Entry> = pending.iter().filter(|e| e.id > newest_kept).collect();
        let behind = self.behind(&fresh);
        let settled_covered = self.settled_covered(&next);
        let order: Vec<Entry> = match (behind, fresh.last()) {
            (true, Some(newest)) => {
                // Look again soon: more may be waiting.
                settled = false;
                vec![(*newest).clone()]
            }
            (_, None) if !settled_covered.is_empty() => {
                // Caught up: the oldest epoch a merged upload stood for
                // that the policy keeps goes up as it is (its parent is up
                // by then, or it goes up merged onto an ancestor). One per
                // pass: a pass uploads its whole list before it looks for
                // new epochs, so a long backfill in one pass (a minute of
                // 1 s epochs of 125 MB each) would hold the newest back.
                tracing::debug!(
                    epochs = settled_covered.len(),
                    "replication caught up: shipping an epoch a merged epoch stood for"
                );
                settled = false;
                let oldest = settled_covered[0].clone();
                self.covered.remove(&oldest.id);
                let mut all = pending;
                all.push(oldest);
                all.sort_by_key(|e| e.id);
                all
            }
            _ => {
                // Some wait for replication to catch up.
                settled &= settled_covered.is_empty();
                pending
            }
        };
        let (mut uploaded, mut published) = (Vec::new(), Instant::now());
        let last = order.len();
        for (i, e) in order.into_iter().enumerate() {
            if kept.contains_key(&e.id) || self.covered.contains_key(&e.id) {
                continue;
            }
            let t = Instant::now();
            let single = if behind { None } else { chain_depth(&kept, e.parent) };
            let sent = if let Some(d) = single {
                if named.contains(&e.object) {
                    // Up already (its parent was sent again this pass).
                    kept.insert(e.id, (e, d));
                    continue;
                }
                // Opened only now (a backlog of thousands of epochs must not
                // hold thousands of descriptors); uploaded from this
                // descriptor only if it is still the version listed, so a
                // file replaced or removed meanwhile is seen at the next pass.
                let path = self.dir.join("epochs").join(store::epoch_file_name(e.id));
                let file = match open_epoch(&path, e.id)? {
                    Some((file, now)) if now.object == e.object => file,
                    _ => {
                        self.listed.remove(&e.id);
                        return Ok(false);
                    }
                };
                self.unnamed.insert(e.object.clone());
                self.client.put_file(&e.object, &file, e.bytes, &path)?;
                (e, d)
            } else {
                // Onto the nearest ancestor kept with room under the chain
                // limit; when the parent is kept but its chain is full, onto
                // one at most half as deep (a remote fold), so that the
                // epochs after this one go up as they are again.
                let parent_full = !behind && e.parent.is_some_and(|p| kept.contains_key(&p));
                let room = if parent_full {
                    MAX_REMOTE_CHAIN / 2
                } else {
                    MAX_REMOTE_CHAIN - 1
                };
                let sent = self.ship_merged(e.id, &kept, room, shared)?;
                let d = chain_depth(&kept, sent.parent).unwrap_or(1);
                (sent, d)
            };
            let secs = t.elapsed().as_secs_f64();
            if self.recent.len() == RATE_SAMPLES {
                self.recent.pop_front();
            }
            self.recent.push_back((sent.0.bytes, secs));
            let mut c = shared.control.lock().unwrap_or_else(|p| p.into_inner());
            c.status.uploaded_objects += 1;
            c.status.uploaded_bytes += sent.0.bytes;
            c.status.upload_s += secs;
            drop(c);
            uploaded.push(sent.0.clone());
            kept.insert(sent.0.id, sent);
            // A long backlog moves the recovery point as it goes up, not
            // once at the end of the pass.
            if i + 1 < last && published.elapsed() >= INTERIM_MANIFEST {
                self.publish_interim(&uploaded, shared)?;
                published = Instant::now();
            }
        }
        // Every epoch named has its parent named (a safety net: the
        // choices above keep it so).
        let mut fin: BTreeMap<u64, Entry> = BTreeMap::new();
        for (id, (e, _)) in kept {
            if e.parent.is_none_or(|p| fin.contains_key(&p)) {
                fin.insert(id, e);
            } else {
                settled = false;
            }
        }
        let fin: Vec<Entry> = fin.into_values().collect();
        if fin != self.manifest.epochs || self.manifest.generation == 0 {
            self.publish(fin, shared)?;
        }
        // Only now: the manifest no longer names them. (A stray left by an
        // upload cut short may have gone up again since, under its name.)
        let named: BTreeSet<String> = self.manifest.epochs.iter().map(|e| e.object.clone()).collect();
        for o in std::mem::take(&mut self.unnamed) {
            if !named.contains(&o) {
                self.strays.insert(o);
            }
        }
        self.strays.retain(|o| !named.contains(o));
        while let Some(o) = self.strays.pop_first() {
            if let Err(e) = self.client.delete(&o) {
                self.strays.insert(o);
                return Err(e);
            }
            shared
                .control
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .status
                .deleted_objects += 1;
        }
        Ok(settled)
    }
}

/// The epochs a pass keeps named remotely, by id: each one's entry and the
/// length of its remote chain.
type Kept = BTreeMap<u64, (Entry, usize)>;

/// The remote chain length of an epoch whose parent is `parent`, given the
/// epochs kept so far; `None` if the parent is not kept or the chain would
/// be longer than [`MAX_REMOTE_CHAIN`].
fn chain_depth(kept: &Kept, parent: Option<u64>) -> Option<usize> {
    match parent {
        None => Some(1),
        Some(p) => kept.get(&p).map(|(_, d)| d + 1).filter(|&d| d <= MAX_REMOTE_CHAIN),
    }
}

/// (inode, size, mtime ns): the identity of a listed file.
fn stat_of(md: &std::fs::Metadata) -> (u64, u64, i64) {
    (md.ino(), md.size(), md.mtime() * 1_000_000_000 + md.mtime_nsec())
}

/// Open epoch file `path` and read what replication needs from its
/// header; `None` if it is gone.
fn open_epoch(path: &Path, id: u64) -> Result<Option<(File, Local)>> {
    let Ok(file) = File::open(path) else {
        return Ok(None);
    };
    // The descriptor's own identity: the name may have moved on.
    let md = file.metadata().map_err(io("stat", path))?;
    let mut head = vec![0u8; HEADER_SIZE];
    file.read_exact_at(&mut head, 0)
        .map_err(io("read the header of", path))?;
    let h = Header::decode(&head, path).map_err(Box::new)?;
    let tag = xxhash_rust::xxh3::xxh3_64(&head);
    let local = Local {
        id,
        parent: (!h.is_full()).then_some(h.parent),
        created_ns: h.created_ns,
        bytes: md.size(),
        object: object_name(id, tag),
        stat: stat_of(&md),
    };
    Ok(Some((file, local)))
}
