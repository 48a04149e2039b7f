//! A linearizability checker for etcd's KV model, used by [`crate::robustness`].
//!
//! **The model.** etcd's state is a revision counter and, per key, `(value, create_revision,
//! mod_revision, version, lease)`. A call is a Txn (compares, then the success or failure list of
//! Range / Put / DeleteRange) or a LeaseRevoke. A call that changes a key makes exactly one new
//! revision; a call that changes nothing (a read, a Txn whose chosen branch only reads or deletes
//! nothing) answers with the current revision. Values are compared by a 64-bit hash, so a history
//! of megabyte objects stays small.
//!
//! **The search.** A general checker (Wing–Gong, or porcupine's P-compositional search) looks for
//! an order of the calls consistent with their real-time intervals; porcupine makes that tractable
//! for etcd by partitioning per key, and etcd's robustness suite keeps the revision by checking a
//! per-key model plus revision ordering. We use what etcd hands every client instead: **the header
//! revision orders the calls**. Every acknowledged write names its own revision, so the order of
//! the known writes is given, and what remains is
//! 1. *revisions are unique and follow real time*: no two acknowledged writes share a revision, and
//!    a call that starts after another returned sees at least its revision (a write: a later one);
//! 2. *replay*: applying the writes in revision order, each write's compares, succeeded flag and
//!    answers (Range results, prev_kv, deleted counts) are what the model gives at the revision
//!    before it, and each read equals the model at its header revision (or at its pinned revision);
//! 3. *the unknowns*: a revision no acknowledged write claims was made by a call whose outcome the
//!    client never learned (timeout, UNAVAILABLE after sending), by a lease revoke, or by a writer
//!    the clients cannot see (the proxy's own keys under `/etcd-squeeze/`, other tenants). A value
//!    of an unknown call seen by any read or watch event fixes that call at the event's
//!    mod_revision; the rest are searched depth-first, gap by gap (invisible writer first, then
//!    each pending unknown call that is not known to have started later), with backtracking and
//!    a step budget, as porcupine times out.
//!
//! The result is the linearization (what changed at every revision), against which the watch
//! histories are checked in [`crate::history::check_with_model`].
//!
//! Self-tests at the end: a stale read after an acknowledged write, a lost update, a write visible
//! before its Txn was sent, revisions out of order, and a value no write produced are rejected;
//! good histories with concurrent calls, unknown outcomes (applied or not), invisible writers and
//! leases are accepted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// A value's hash ([`hash`]).
pub type Hash = u64;

/// The 64-bit hash values are compared by.
pub fn hash(value: &[u8]) -> Hash {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(value);
    h.finish()
}

/// One key's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kv {
    /// Hash of the value.
    pub value: Hash,
    /// `create_revision`.
    pub create_revision: i64,
    /// `mod_revision`.
    pub mod_revision: i64,
    /// `version`.
    pub version: i64,
    /// `lease` (0: none).
    pub lease: i64,
}

/// A key and its state, as a Range answers it.
pub type Entry = (Vec<u8>, Kv);

/// What a compare tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `VALUE` (the hash; only `Equal` and `NotEqual` are meaningful on hashes).
    Value(Hash),
    /// `VERSION`.
    Version(i64),
    /// `CREATE`.
    Create(i64),
    /// `MOD`.
    Mod(i64),
    /// `LEASE`.
    Lease(i64),
}

/// A compare's operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// `EQUAL`.
    Equal,
    /// `NOT_EQUAL`.
    NotEqual,
    /// `GREATER`.
    Greater,
    /// `LESS`.
    Less,
}

/// One compare of a Txn (one key).
#[derive(Clone, Debug)]
pub struct Compare {
    /// The key.
    pub key: Vec<u8>,
    /// The operator.
    pub cmp: Cmp,
    /// The target and its operand.
    pub target: Target,
}

/// One operation of a Txn (or a top-level call, as a Txn without compares).
#[derive(Clone, Debug)]
pub enum Request {
    /// RangeRequest: `range_end` empty for one key, `[0]` for every key from `key`;
    /// `revision` 0 for the current one; `limit` 0 for no limit.
    Range { key: Vec<u8>, range_end: Vec<u8>, revision: i64, limit: i64 },
    /// PutRequest (`prev_kv` asked or not).
    Put { key: Vec<u8>, value: Hash, lease: i64, prev_kv: bool },
    /// DeleteRangeRequest.
    Delete { key: Vec<u8>, range_end: Vec<u8>, prev_kv: bool },
}

/// One answer of a Txn's op, in the model's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// RangeResponse: `kvs` in key order, `count`, `more`.
    Range { kvs: Vec<Entry>, count: i64, more: bool },
    /// PutResponse: `prev_kv` (when asked and the key existed).
    Put { prev: Option<Kv> },
    /// DeleteRangeResponse: `deleted` and `prev_kvs` (when asked).
    Delete { deleted: i64, prev: Vec<Entry> },
}

/// A call a client made.
#[derive(Clone, Debug)]
pub enum Call {
    /// A Txn; a top-level Range, Put or DeleteRange is a Txn without compares.
    Txn { compare: Vec<Compare>, success: Vec<Request>, failure: Vec<Request> },
    /// LeaseRevoke: deletes every key attached to the lease.
    LeaseRevoke(i64),
}

/// What the client learned.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// etcd answered: the header revision, `succeeded` (true for calls without compares) and the
    /// chosen branch's answers in order.
    Ok { revision: i64, succeeded: bool, responses: Vec<Response> },
    /// etcd refused it (a definite error: nothing changed).
    Failed,
    /// No answer, or an error after the request may have reached etcd: applied or not.
    Unknown,
}

/// One recorded call: who, when (nanoseconds since the recording started) and what came back.
#[derive(Clone, Debug)]
pub struct Operation {
    /// The client that made it.
    pub client: usize,
    /// When the call was sent.
    pub invoke: u64,
    /// When the answer came (`u64::MAX` for an unknown outcome).
    pub ret: u64,
    /// The call.
    pub call: Call,
    /// The answer.
    pub outcome: Outcome,
}

/// One key changing at one revision in the linearization: the watch event etcd must deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The revision.
    pub revision: i64,
    /// The key.
    pub key: Vec<u8>,
    /// The new state (`None`: deleted).
    pub kv: Option<Kv>,
    /// The state before (`prev_kv`).
    pub prev: Option<Kv>,
}

/// A history proved linearizable: what changed at every revision, in order.
#[derive(Debug, Default)]
pub struct Linearization {
    /// Every change to a key the clients use, in revision (then key) order.
    pub changes: Vec<Change>,
    /// Revisions made by callers the clients cannot see (the proxy's own keys, other tenants).
    pub invisible: usize,
    /// Unknown-outcome calls the linearization applied.
    pub unknown_applied: usize,
    /// Calls that changed state, by revision.
    pub writes: usize,
}

/// A change a watcher was shown: `key` became `value` (`None`: deleted) at `revision`. The
/// linearization must make this change at that revision: it decides which of several
/// unknown-outcome deletes was applied, which no value can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    /// The event's revision.
    pub revision: i64,
    /// The key.
    pub key: Vec<u8>,
    /// The new value's hash (`None`: a DELETE).
    pub value: Option<Hash>,
}

/// Why a history is not linearizable (or could not be decided within the budget).
#[derive(Debug)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Search steps (one try of one candidate at one revision) before giving up as undecided.
pub const BUDGET: u64 = 2_000_000;

/// The model: per key, its states by revision (so a Range pinned to an older revision reads
/// the past), and an undo log for the search.
#[derive(Default)]
struct Store {
    keys: BTreeMap<Vec<u8>, Vec<(i64, Option<Kv>)>>,
    rev: i64,
    undo: Vec<Vec<Vec<u8>>>,
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

impl Store {
    fn get(&self, key: &[u8], at: i64) -> Option<Kv> {
        let states = self.keys.get(key)?;
        let i = states.partition_point(|(r, _)| *r <= at);
        if i == 0 {
            None
        } else {
            states[i - 1].1
        }
    }

    /// Keys with a state at `at` in the range, in key order, with `overlay` (a Txn's own writes)
    /// on top.
    fn range(&self, start: &[u8], end: &[u8], at: i64, overlay: &BTreeMap<Vec<u8>, Option<Kv>>) -> Vec<Entry> {
        let mut out: BTreeMap<Vec<u8>, Kv> = BTreeMap::new();
        let lower = std::ops::Bound::Included(start.to_vec());
        for (k, _) in self.keys.range((lower.clone(), std::ops::Bound::Unbounded)) {
            if !in_range(k, start, end) {
                break;
            }
            if let Some(kv) = self.get(k, at) {
                out.insert(k.clone(), kv);
            }
        }
        for (k, v) in overlay.range((lower, std::ops::Bound::Unbounded)) {
            if !in_range(k, start, end) {
                break;
            }
            match v {
                Some(kv) => out.insert(k.clone(), *kv),
                None => out.remove(k),
            };
        }
        out.into_iter().collect()
    }

    /// Makes revision `rev + 1` with these changes; returns the changes as events.
    fn apply(&mut self, changes: BTreeMap<Vec<u8>, Option<Kv>>) -> Vec<Change> {
        self.rev += 1;
        let mut keys = Vec::new();
        let mut events = Vec::new();
        for (k, kv) in changes {
            let prev = self.get(&k, self.rev - 1);
            events.push(Change { revision: self.rev, key: k.clone(), kv, prev });
            self.keys.entry(k.clone()).or_default().push((self.rev, kv));
            keys.push(k);
        }
        self.undo.push(keys);
        events
    }

    fn unapply(&mut self) {
        for k in self.undo.pop().expect("a revision to undo") {
            let states = self.keys.get_mut(&k).expect("an applied key");
            states.pop();
            if states.is_empty() {
                self.keys.remove(&k);
            }
        }
        self.rev -= 1;
    }

    /// Runs `call` on the current state as the next revision would: (succeeded, answers, changes).
    fn run(&self, call: &Call) -> (bool, Vec<Response>, BTreeMap<Vec<u8>, Option<Kv>>) {
        let next = self.rev + 1;
        let mut overlay: BTreeMap<Vec<u8>, Option<Kv>> = BTreeMap::new();
        let (compare, success, failure) = match call {
            Call::Txn { compare, success, failure } => (compare, success, failure),
            Call::LeaseRevoke(id) => {
                for (k, kv) in self.range(&[], &[0], self.rev, &overlay) {
                    if kv.lease == *id {
                        overlay.insert(k, None);
                    }
                }
                return (true, Vec::new(), overlay);
            }
        };
        let succeeded = compare.iter().all(|c| {
            let kv = self.get(&c.key, self.rev);
            let ord = |a: i64, b: i64| a.cmp(&b);
            let o = match (c.target, kv) {
                (Target::Value(v), kv) => {
                    let Some(kv) = kv else { return false };
                    return match c.cmp {
                        Cmp::Equal => kv.value == v,
                        Cmp::NotEqual => kv.value != v,
                        _ => panic!("the model compares values by hash: only EQUAL and NOT_EQUAL"),
                    };
                }
                (Target::Version(v), kv) => ord(kv.map_or(0, |k| k.version), v),
                (Target::Create(v), kv) => ord(kv.map_or(0, |k| k.create_revision), v),
                (Target::Mod(v), kv) => ord(kv.map_or(0, |k| k.mod_revision), v),
                (Target::Lease(v), kv) => ord(kv.map_or(0, |k| k.lease), v),
            };
            match c.cmp {
                Cmp::Equal => o.is_eq(),
                Cmp::NotEqual => o.is_ne(),
                Cmp::Greater => o.is_gt(),
                Cmp::Less => o.is_lt(),
            }
        });
        let mut answers = Vec::new();
        for op in if succeeded { success } else { failure } {
            match op {
                Request::Range { key, range_end, revision, limit } => {
                    let at = if *revision > 0 { *revision } else { self.rev };
                    let overlay = if *revision > 0 { BTreeMap::new() } else { overlay.clone() };
                    let mut kvs = self.range(key, range_end, at, &overlay);
                    let count = kvs.len() as i64;
                    let more = *limit > 0 && count > *limit;
                    if *limit > 0 {
                        kvs.truncate(*limit as usize);
                    }
                    answers.push(Response::Range { kvs, count, more });
                }
                Request::Put { key, value, lease, prev_kv } => {
                    let prev = match overlay.get(key) {
                        Some(v) => *v,
                        None => self.get(key, self.rev),
                    };
                    let kv = Kv {
                        value: *value,
                        create_revision: prev.map_or(next, |p| p.create_revision),
                        mod_revision: next,
                        version: prev.map_or(1, |p| p.version + 1),
                        lease: *lease,
                    };
                    overlay.insert(key.clone(), Some(kv));
                    answers.push(Response::Put { prev: if *prev_kv { prev } else { None } });
                }
                Request::Delete { key, range_end, prev_kv } => {
                    let gone = self.range(key, range_end, self.rev, &overlay);
                    for (k, _) in &gone {
                        overlay.insert(k.clone(), None);
                    }
                    answers.push(Response::Delete { deleted: gone.len() as i64, prev: if *prev_kv { gone } else { Vec::new() } });
                }
            }
        }
        // A delete of a key that never existed in this Txn's view changes nothing.
        overlay.retain(|k, v| v.is_some() || self.get(k, self.rev).is_some());
        (succeeded, answers, overlay)
    }
}

/// Whether a recorded answer says the call made a revision: its chosen branch put a key or
/// deleted one (a LeaseRevoke cannot tell; see [`check`]).
fn recorded_write(call: &Call, outcome: &Outcome) -> bool {
    let (Call::Txn { success, failure, .. }, Outcome::Ok { succeeded, responses, .. }) = (call, outcome) else { return false };
    let branch = if *succeeded { success } else { failure };
    branch.iter().zip(responses).any(|(req, resp)| match (req, resp) {
        (Request::Put { .. }, _) => true,
        (Request::Delete { .. }, Response::Delete { deleted, .. }) => *deleted > 0,
        _ => false,
    })
}

/// The values a call writes.
fn written_values(call: &Call) -> Vec<Hash> {
    match call {
        Call::Txn { success, failure, .. } => success
            .iter()
            .chain(failure)
            .filter_map(|r| match r {
                Request::Put { value, .. } => Some(*value),
                _ => None,
            })
            .collect(),
        Call::LeaseRevoke(_) => Vec::new(),
    }
}

/// Every key state the clients were shown (Range results, prev_kvs), plus `seen` (watch events).
fn observed(ops: &[Operation], seen: &[Kv]) -> Vec<Kv> {
    let mut out: Vec<Kv> = seen.to_vec();
    for op in ops {
        if let Outcome::Ok { responses, .. } = &op.outcome {
            for r in responses {
                match r {
                    Response::Range { kvs, .. } => out.extend(kvs.iter().map(|(_, kv)| *kv)),
                    Response::Put { prev } => out.extend(prev.iter().copied()),
                    Response::Delete { prev, .. } => out.extend(prev.iter().map(|(_, kv)| *kv)),
                }
            }
        }
    }
    out
}

/// Values the clients saw (Range results, prev_kvs and `seen`) that no recorded call wrote:
/// values the proxy altered. Returns how many distinct ones.
pub fn altered_values(ops: &[Operation], seen: &[Kv]) -> usize {
    let written: HashSet<Hash> = ops.iter().flat_map(|o| written_values(&o.call)).collect();
    observed(ops, seen).iter().map(|kv| kv.value).filter(|v| !written.contains(v)).collect::<HashSet<_>>().len()
}

fn describe(i: usize, op: &Operation) -> String {
    let what = match &op.call {
        Call::LeaseRevoke(id) => format!("LeaseRevoke({id:x})"),
        Call::Txn { compare, success, failure } => {
            let key = |r: &Request| match r {
                Request::Range { key, .. } | Request::Put { key, .. } | Request::Delete { key, .. } => String::from_utf8_lossy(key).into_owned(),
            };
            let kind = |r: &Request| match r {
                Request::Range { .. } => "range",
                Request::Put { .. } => "put",
                Request::Delete { .. } => "delete",
            };
            let ops: Vec<String> = success.iter().map(|r| format!("{} {}", kind(r), key(r))).collect();
            let els: Vec<String> = failure.iter().map(|r| format!("{} {}", kind(r), key(r))).collect();
            if compare.is_empty() {
                ops.join(", ")
            } else {
                format!("txn[{} compares] then [{}] else [{}]", compare.len(), ops.join(", "), els.join(", "))
            }
        }
    };
    let result = match &op.outcome {
        Outcome::Ok { revision, succeeded, .. } => format!("→ revision {revision}, succeeded {succeeded}"),
        Outcome::Failed => "→ failed".into(),
        Outcome::Unknown => "→ unknown".into(),
    };
    format!("op {i} (client {}, {}–{} µs): {what} {result}", op.client, op.invoke / 1000, if op.ret == u64::MAX { u64::MAX } else { op.ret / 1000 })
}

/// What happened at one revision in the search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Maker {
    Known(usize),
    Unknown(usize),
    Revoke(usize),
    Invisible,
}

/// Checks `ops` (all calls of all clients, any order), starting from a state with none of their
/// keys at revision `start`; `seen` are key states the clients saw outside `ops` (watch events'
/// values and prev_kvs) and `watched` the changes watch events showed at their revisions.
/// Returns the linearization, or the first violation found.
pub fn check(ops: &[Operation], start: i64, seen: &[Kv], watched: &[Watched]) -> Result<Linearization, Violation> {
    let fail = |s: String| Err(Violation(s));
    // 1. Revisions claimed by acknowledged writes are unique and after `start`.
    let mut claimed: HashMap<i64, usize> = HashMap::new();
    let mut max_rev = start;
    for (i, op) in ops.iter().enumerate() {
        if let Outcome::Ok { revision, .. } = op.outcome {
            max_rev = max_rev.max(revision);
            if recorded_write(&op.call, &op.outcome) {
                if revision <= start {
                    return fail(format!("{} claims revision {revision}, not after the start {start}", describe(i, op)));
                }
                if let Some(j) = claimed.insert(revision, i) {
                    return fail(format!("revision {revision} claimed twice: {} and {}", describe(j, &ops[j]), describe(i, op)));
                }
            }
        }
    }
    // 2. Real time: a call that started after another returned has at least its revision, and a
    //    write a greater one.
    let known: Vec<usize> = (0..ops.len()).filter(|&i| matches!(ops[i].outcome, Outcome::Ok { .. })).collect();
    let rev_of = |i: usize| match ops[i].outcome {
        Outcome::Ok { revision, .. } => revision,
        _ => unreachable!(),
    };
    let mut by_ret = known.clone();
    by_ret.sort_by_key(|&i| ops[i].ret);
    let mut by_invoke = known.clone();
    by_invoke.sort_by_key(|&i| ops[i].invoke);
    let (mut j, mut max_before, mut max_op) = (0, i64::MIN, usize::MAX);
    for &b in &by_invoke {
        while j < by_ret.len() && ops[by_ret[j]].ret < ops[b].invoke {
            if rev_of(by_ret[j]) > max_before {
                max_before = rev_of(by_ret[j]);
                max_op = by_ret[j];
            }
            j += 1;
        }
        let write = claimed.get(&rev_of(b)) == Some(&b);
        if rev_of(b) < max_before || (write && rev_of(b) == max_before && max_op != b) {
            return fail(format!(
                "real-time order broken: {} started after {} returned, yet has {} revision",
                describe(b, &ops[b]),
                describe(max_op, &ops[max_op]),
                if write { "no greater" } else { "a smaller" }
            ));
        }
    }
    // 3. Unknown outcomes: the earliest revision each may have, and the revision a seen value fixes.
    let lower = |invoke: u64| by_ret.iter().take_while(|&&a| ops[a].ret < invoke).map(|&a| rev_of(a)).max().unwrap_or(start);
    let mut first_seen: HashMap<Hash, i64> = HashMap::new();
    for kv in observed(ops, seen) {
        first_seen.entry(kv.value).or_insert(kv.mod_revision);
    }
    let writes = |call: &Call| match call {
        Call::LeaseRevoke(_) => true,
        Call::Txn { success, failure, .. } => success.iter().chain(failure).any(|r| !matches!(r, Request::Range { .. })),
    };
    let unknown: Vec<usize> = (0..ops.len()).filter(|&i| matches!(ops[i].outcome, Outcome::Unknown) && writes(&ops[i].call)).collect();
    let lower_of: HashMap<usize, i64> = unknown.iter().map(|&u| (u, lower(ops[u].invoke))).collect();
    let mut forced: HashMap<i64, usize> = HashMap::new();
    for &u in &unknown {
        if let Some(rev) = written_values(&ops[u].call).iter().find_map(|v| first_seen.get(v)) {
            if let Some(&k) = claimed.get(rev) {
                return fail(format!("a value of {} was seen at revision {rev}, which {} made", describe(u, &ops[u]), describe(k, &ops[k])));
            }
            if let Some(w) = forced.insert(*rev, u) {
                return fail(format!("values of {} and {} were both seen at revision {rev}", describe(w, &ops[w]), describe(u, &ops[u])));
            }
            max_rev = max_rev.max(*rev);
        }
    }
    let forced_ops: HashSet<usize> = forced.values().copied().collect();
    let mut watched_at: HashMap<i64, Vec<&Watched>> = HashMap::new();
    for w in watched {
        watched_at.entry(w.revision).or_default().push(w);
    }
    // Every change a watcher saw at `rev` is among the changes made there.
    let check_watched = |rev: i64, changes: &[Change]| -> Result<(), String> {
        for w in watched_at.get(&rev).into_iter().flatten() {
            if !changes.iter().any(|c| c.key == w.key && c.kv.map(|kv| kv.value) == w.value) {
                return Err(format!("a watcher saw {:?} {} at revision {rev}, which this order does not make", String::from_utf8_lossy(&w.key), if w.value.is_some() { "put" } else { "deleted" }));
            }
        }
        Ok(())
    };
    // Calls that change nothing are checked at their header revision; LeaseRevokes may have made it.
    let mut reads_at: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    let mut revokes_at: HashMap<i64, Vec<usize>> = HashMap::new();
    for &i in &known {
        if claimed.get(&rev_of(i)) != Some(&i) {
            reads_at.entry(rev_of(i)).or_default().push(i);
        }
        if matches!(ops[i].call, Call::LeaseRevoke(_)) {
            revokes_at.entry(rev_of(i)).or_default().push(i);
        }
    }

    // 4. Replay, revision by revision, searching the gaps.
    let mut store = Store { rev: start, ..Store::default() };
    let check_reads = |store: &Store, rev: i64, made: &[Maker]| -> Result<(), String> {
        for &i in reads_at.get(&rev).into_iter().flatten() {
            if let Call::LeaseRevoke(id) = ops[i].call {
                let applied = made.contains(&Maker::Revoke(i));
                if !applied && store.range(&[], &[0], rev, &BTreeMap::new()).iter().any(|(_, kv)| kv.lease == id) {
                    return Err(format!("{}: keys still attached at its revision", describe(i, &ops[i])));
                }
                continue;
            }
            // Run the read as it would run on the state at `rev` (the current state here).
            let (succeeded, responses, changes) = store.run(&ops[i].call);
            let Outcome::Ok { succeeded: s, responses: r, .. } = &ops[i].outcome else { unreachable!() };
            if !changes.is_empty() || succeeded != *s || responses != *r {
                return Err(format!("{} does not match the state at revision {rev}: model says succeeded {succeeded}, {responses:?}; etcd said {r:?}", describe(i, &ops[i])));
            }
        }
        Ok(())
    };
    if let Err(e) = check_reads(&store, start, &[]) {
        return fail(e);
    }
    // The search: per revision, the candidates and the one being tried.
    struct Level {
        candidates: Vec<Maker>,
        next: usize,
        changes: Vec<Change>,
    }
    let mut levels: Vec<Level> = Vec::new();
    let mut made: Vec<Maker> = Vec::new();
    let mut placed: HashSet<usize> = HashSet::new();
    let (mut steps, mut deepest, mut deepest_why) = (0u64, start, String::new());
    let candidates_at = |rev: i64, placed: &HashSet<usize>| -> Vec<Maker> {
        if let Some(&k) = claimed.get(&rev) {
            return vec![Maker::Known(k)];
        }
        if let Some(&u) = forced.get(&rev) {
            // Seen at this revision; impossible if a call that returned before it was sent had this revision or a later one.
            return if lower_of[&u] < rev { vec![Maker::Unknown(u)] } else { Vec::new() };
        }
        let mut c: Vec<Maker> = revokes_at.get(&rev).into_iter().flatten().map(|&i| Maker::Revoke(i)).collect();
        c.push(Maker::Invisible);
        c.extend(unknown.iter().filter(|u| !placed.contains(u) && !forced_ops.contains(u) && lower_of[u] < rev).map(|&u| Maker::Unknown(u)));
        c
    };
    let mut rev = start + 1;
    let mut pending: Option<Vec<Maker>> = None;
    while rev <= max_rev {
        let mut level = match pending.take() {
            Some(c) => Level { candidates: c, next: 0, changes: Vec::new() },
            None => Level { candidates: candidates_at(rev, &placed), next: 0, changes: Vec::new() },
        };
        let mut ok = false;
        if level.candidates.is_empty() && rev >= deepest {
            (deepest, deepest_why) = (rev, format!("revision {rev} holds a value of a call sent after a call that returned with revision {rev} or later"));
        }
        while level.next < level.candidates.len() {
            let maker = level.candidates[level.next];
            level.next += 1;
            steps += 1;
            if steps > BUDGET {
                return fail(format!("undecided after {BUDGET} search steps (deepest revision {deepest}: {deepest_why})"));
            }
            let tried: Result<Vec<Change>, String> = match maker {
                Maker::Invisible => {
                    store.apply(BTreeMap::new());
                    Ok(Vec::new())
                }
                Maker::Known(i) | Maker::Unknown(i) | Maker::Revoke(i) => {
                    let (succeeded, responses, changes) = store.run(&ops[i].call);
                    let mismatch = match (maker, &ops[i].outcome) {
                        (Maker::Known(_), Outcome::Ok { succeeded: s, responses: r, .. }) if succeeded != *s || responses != *r => Some(format!(
                            "{} does not match the state at revision {}: model says succeeded {succeeded}, {responses:?}; etcd said {r:?}",
                            describe(i, &ops[i]),
                            rev - 1
                        )),
                        _ => None,
                    };
                    if let Some(why) = mismatch {
                        Err(why)
                    } else if changes.is_empty() {
                        Err(format!("{} changes nothing at revision {rev}, yet {}", describe(i, &ops[i]), if matches!(maker, Maker::Known(_)) { "it claims this revision" } else { "the revision was made" }))
                    } else {
                        Ok(store.apply(changes))
                    }
                }
            };
            match tried {
                Err(why) => {
                    if rev >= deepest {
                        (deepest, deepest_why) = (rev, why);
                    }
                }
                Ok(changes) => {
                    made.push(maker);
                    if let Err(why) = check_watched(rev, &changes).and_then(|()| check_reads(&store, rev, &made)) {
                        made.pop();
                        store.unapply();
                        if rev >= deepest {
                            (deepest, deepest_why) = (rev, why);
                        }
                        continue;
                    }
                    if let Maker::Unknown(u) = maker {
                        placed.insert(u);
                    }
                    level.changes = changes;
                    ok = true;
                    break;
                }
            }
        }
        if ok {
            levels.push(level);
            rev += 1;
            continue;
        }
        // Backtrack to the last level with a candidate left.
        loop {
            let Some(prev) = levels.pop() else {
                return fail(format!("not linearizable: no order explains revision {deepest}: {deepest_why}"));
            };
            rev -= 1;
            store.unapply();
            if let Some(Maker::Unknown(u)) = made.pop() {
                placed.remove(&u);
            }
            if prev.next < prev.candidates.len() {
                // Retry this revision from its next candidate.
                let Level { candidates, next, .. } = prev;
                pending = Some(candidates[next..].to_vec());
                break;
            }
        }
    }
    let mut out = Linearization::default();
    for (level, maker) in levels.into_iter().zip(&made) {
        match maker {
            Maker::Invisible => out.invisible += 1,
            Maker::Unknown(_) => out.unknown_applied += 1,
            _ => {}
        }
        out.writes += 1;
        out.changes.extend(level.changes);
    }
    Ok(out)
}

#[cfg(test)]
mod self_tests {
    use super::*;

    fn k(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }
    fn put(key: &str, value: u64) -> Request {
        Request::Put { key: k(key), value, lease: 0, prev_kv: false }
    }
    fn get(key: &str) -> Request {
        Request::Range { key: k(key), range_end: Vec::new(), revision: 0, limit: 0 }
    }
    fn kv(value: u64, create: i64, modr: i64, version: i64) -> Kv {
        Kv { value, create_revision: create, mod_revision: modr, version, lease: 0 }
    }
    fn op(client: usize, invoke: u64, ret: u64, call: Call, outcome: Outcome) -> Operation {
        Operation { client, invoke, ret, call, outcome }
    }
    fn plain(r: Request) -> Call {
        Call::Txn { compare: Vec::new(), success: vec![r], failure: Vec::new() }
    }
    fn ok(revision: i64, responses: Vec<Response>) -> Outcome {
        Outcome::Ok { revision, succeeded: true, responses }
    }
    fn read(entries: Vec<(&str, Kv)>) -> Response {
        let n = entries.len() as i64;
        Response::Range { kvs: entries.into_iter().map(|(key, kv)| (k(key), kv)).collect(), count: n, more: false }
    }
    /// GuaranteedUpdate's Txn: MOD(key) == m → put, else get.
    fn update(key: &str, m: i64, value: u64) -> Call {
        Call::Txn { compare: vec![Compare { key: k(key), cmp: Cmp::Equal, target: Target::Mod(m) }], success: vec![put(key, value)], failure: vec![get(key)] }
    }

    #[test]
    fn accepts_concurrent_writes_and_reads() {
        // Two clients: a put, a concurrent read that sees the older state, a GuaranteedUpdate.
        let ops = vec![
            op(0, 0, 10, plain(put("a", 1)), ok(2, vec![Response::Put { prev: None }])),
            op(1, 5, 30, plain(get("a")), ok(2, vec![read(vec![("a", kv(1, 2, 2, 1))])])),
            op(0, 20, 40, update("a", 2, 2), ok(3, vec![Response::Put { prev: None }])),
            op(1, 25, 35, plain(get("a")), ok(2, vec![read(vec![("a", kv(1, 2, 2, 1))])])), // concurrent with the update
            op(1, 50, 60, plain(get("a")), ok(3, vec![read(vec![("a", kv(2, 2, 3, 2))])])),
        ];
        let l = check(&ops, 1, &[], &[]).unwrap();
        assert_eq!(l.changes.len(), 2);
    }

    #[test]
    fn rejects_a_stale_read_after_an_acknowledged_write() {
        let ops = vec![
            op(0, 0, 10, plain(put("a", 1)), ok(2, vec![Response::Put { prev: None }])),
            op(0, 20, 30, plain(put("a", 2)), ok(3, vec![Response::Put { prev: None }])),
            // Started after the second put returned, yet reads revision 2's state.
            op(1, 40, 50, plain(get("a")), ok(2, vec![read(vec![("a", kv(1, 2, 2, 1))])])),
        ];
        let e = check(&ops, 1, &[], &[]).unwrap_err();
        assert!(e.0.contains("real-time order"), "{e}");
        // The same stale value under a fresh header revision: the state check catches it.
        let mut ops = ops;
        ops[2].outcome = ok(3, vec![read(vec![("a", kv(1, 2, 2, 1))])]);
        let e = check(&ops, 1, &[], &[]).unwrap_err();
        assert!(e.0.contains("does not match"), "{e}");
    }

    #[test]
    fn rejects_a_lost_update() {
        // Two GuaranteedUpdates from the same read both succeed.
        let ops = vec![
            op(0, 0, 10, plain(put("a", 1)), ok(2, vec![Response::Put { prev: None }])),
            op(0, 20, 30, update("a", 2, 2), ok(3, vec![Response::Put { prev: None }])),
            op(1, 20, 40, update("a", 2, 3), ok(4, vec![Response::Put { prev: None }])),
        ];
        let e = check(&ops, 1, &[], &[]).unwrap_err();
        assert!(e.0.contains("does not match the state at revision 3"), "{e}");
    }

    #[test]
    fn rejects_a_write_visible_before_its_txn_was_sent() {
        let ops = vec![
            // A read returns at 10 with the value the Txn below writes, but the Txn starts at 20.
            op(1, 0, 10, plain(get("a")), ok(2, vec![read(vec![("a", kv(7, 2, 2, 1))])])),
            op(0, 20, 30, plain(put("a", 7)), ok(2, vec![Response::Put { prev: None }])),
        ];
        let e = check(&ops, 1, &[], &[]).unwrap_err();
        assert!(e.0.contains("real-time order"), "{e}");
        // The same with an unknown outcome: the value fixes it at revision 2, before it started.
        let mut ops = ops;
        ops[1].outcome = Outcome::Unknown;
        ops[1].ret = u64::MAX;
        let e = check(&ops, 1, &[], &[]).unwrap_err();
        assert!(e.0.contains("not linearizable"), "{e}");
    }

    #[test]
    fn rejects_revisions_out_of_order() {
        // The second write returns before the third starts, yet has a greater revision.
        let ops = vec![
            op(0, 0, 10, plain(put("a", 1)), ok(3, vec![Response::Put { prev: None }])),
            op(1, 20, 30, plain(put("b", 2)), ok(2, vec![Response::Put { prev: None }])),
        ];
        let e = check(&ops, 1, &[], &[]).unwrap_err();
        assert!(e.0.contains("real-time order"), "{e}");
        // Two writes claiming one revision.
        let ops = vec![
            op(0, 0, 10, plain(put("a", 1)), ok(2, vec![Response::Put { prev: None }])),
            op(1, 0, 10, plain(put("b", 2)), ok(2, vec![Response::Put { prev: None }])),
        ];
        assert!(check(&ops, 1, &[], &[]).unwrap_err().0.contains("claimed twice"));
    }

    #[test]
    fn rejects_a_value_no_write_produced() {
        let ops = vec![
            op(0, 0, 10, plain(put("a", 1)), ok(2, vec![Response::Put { prev: None }])),
            op(1, 20, 30, plain(get("a")), ok(2, vec![read(vec![("a", kv(99, 2, 2, 1))])])),
        ];
        assert!(check(&ops, 1, &[], &[]).is_err());
        assert_eq!(altered_values(&ops, &[]), 1);
    }

    #[test]
    fn places_unknown_outcomes_and_invisible_writers() {
        let ops = vec![
            op(0, 0, 10, plain(put("a", 1)), ok(2, vec![Response::Put { prev: None }])),
            // Timed out, applied at revision 4 (a read saw it); revision 3 is an invisible writer.
            op(0, 20, u64::MAX, plain(put("a", 2)), Outcome::Unknown),
            // Timed out, never applied.
            op(1, 20, u64::MAX, plain(put("b", 3)), Outcome::Unknown),
            // Timed out, applied, never read: only the version of `c` says it happened.
            op(2, 20, u64::MAX, plain(put("c", 4)), Outcome::Unknown),
            op(2, 100, 110, plain(put("c", 5)), ok(6, vec![Response::Put { prev: None }])),
            op(1, 200, 210, plain(get("a")), ok(6, vec![read(vec![("a", kv(2, 2, 4, 2))])])),
            op(1, 220, 230, plain(get("c")), ok(6, vec![read(vec![("c", kv(5, 5, 6, 2))])])),
            op(1, 240, 250, plain(get("b")), ok(6, vec![read(vec![])])),
        ];
        let l = check(&ops, 1, &[], &[]).unwrap();
        assert_eq!((l.unknown_applied, l.invisible), (2, 1), "{l:?}");
        // Without the unknown put of `c`, version 2 is unexplained.
        let mut bad = ops.clone();
        bad.remove(3);
        assert!(check(&bad, 1, &[], &[]).is_err());
    }

    #[test]
    fn watch_events_decide_which_unknown_delete_was_applied() {
        let del = |key: &str| plain(Request::Delete { key: k(key), range_end: Vec::new(), prev_kv: false });
        let ops = vec![
            op(0, 0, 10, plain(put("a", 1)), ok(2, vec![Response::Put { prev: None }])),
            op(0, 20, 30, plain(put("b", 2)), ok(3, vec![Response::Put { prev: None }])),
            // Both timed out; one of them made revision 4, and only a watcher can tell which.
            op(0, 40, u64::MAX, del("a"), Outcome::Unknown),
            op(1, 40, u64::MAX, del("b"), Outcome::Unknown),
            op(1, 100, 110, plain(put("c", 3)), ok(5, vec![Response::Put { prev: None }])),
        ];
        let deleted = |l: &Linearization| l.changes.iter().filter(|c| c.kv.is_none()).map(|c| c.key.clone()).collect::<Vec<_>>();
        // Without the watcher an invisible writer explains revision 4 as well as either delete.
        assert_eq!(deleted(&check(&ops, 1, &[], &[]).unwrap()), Vec::<Vec<u8>>::new());
        let saw_b = [Watched { revision: 4, key: k("b"), value: None }];
        assert_eq!(deleted(&check(&ops, 1, &[], &saw_b).unwrap()), vec![k("b")]);
        // A watcher shown a change no call can make at that revision.
        let saw_c = [Watched { revision: 4, key: k("c"), value: Some(3) }];
        assert!(check(&ops, 1, &[], &saw_c).is_err());
    }

    #[test]
    fn leases_and_revokes() {
        let with_lease = |key: &str, value, lease| Request::Put { key: k(key), value, lease, prev_kv: false };
        let ops = vec![
            op(0, 0, 10, plain(with_lease("a", 1, 7)), ok(2, vec![Response::Put { prev: None }])),
            op(0, 20, 30, Call::LeaseRevoke(7), ok(3, vec![])),
            op(0, 40, 50, Call::LeaseRevoke(8), ok(3, vec![])),
            op(1, 60, 70, plain(get("a")), ok(3, vec![read(vec![])])),
        ];
        let l = check(&ops, 1, &[], &[]).unwrap();
        assert_eq!(l.changes.last().unwrap().kv, None);
        // A read after the revoke that still sees the key.
        let mut bad = ops.clone();
        bad[3].outcome = ok(3, vec![read(vec![("a", Kv { lease: 7, ..kv(1, 2, 2, 1) })])]);
        assert!(check(&bad, 1, &[], &[]).is_err());
    }

    #[test]
    fn pinned_reads_see_the_past_and_pages_count() {
        let ops = vec![
            op(0, 0, 10, plain(put("p/a", 1)), ok(2, vec![Response::Put { prev: None }])),
            op(0, 20, 30, plain(put("p/b", 2)), ok(3, vec![Response::Put { prev: None }])),
            op(0, 40, 50, plain(put("p/a", 3)), ok(4, vec![Response::Put { prev: None }])),
            op(
                1,
                60,
                70,
                plain(Request::Range { key: k("p/"), range_end: k("p0"), revision: 3, limit: 1 }),
                ok(4, vec![Response::Range { kvs: vec![(k("p/a"), kv(1, 2, 2, 1))], count: 2, more: true }]),
            ),
        ];
        check(&ops, 1, &[], &[]).unwrap();
        let mut bad = ops.clone();
        bad[3].outcome = ok(4, vec![Response::Range { kvs: vec![(k("p/a"), kv(3, 2, 4, 2))], count: 2, more: true }]);
        assert!(check(&bad, 1, &[], &[]).is_err());
    }

    #[test]
    fn compares_on_version_lease_and_order() {
        let with_lease = |key: &str, value, lease| Request::Put { key: k(key), value, lease, prev_kv: false };
        let txn = |target, cmp| Call::Txn { compare: vec![Compare { key: k("a"), cmp, target }], success: vec![put("b", 9)], failure: vec![get("b")] };
        let ops = vec![
            op(0, 0, 10, plain(with_lease("a", 1, 5)), ok(2, vec![Response::Put { prev: None }])),
            op(0, 20, 30, txn(Target::Version(0), Cmp::Greater), ok(3, vec![Response::Put { prev: None }])),
            op(0, 40, 50, txn(Target::Lease(5), Cmp::NotEqual), Outcome::Ok { revision: 3, succeeded: false, responses: vec![read(vec![("b", kv(9, 3, 3, 1))])] }),
            op(0, 60, 70, txn(Target::Mod(3), Cmp::Less), ok(4, vec![Response::Put { prev: None }])),
        ];
        check(&ops, 1, &[], &[]).unwrap();
        // The LEASE compare said succeeded: the model's key has lease 5, so it did not.
        let mut bad = ops[..3].to_vec();
        bad[2].outcome = ok(4, vec![Response::Put { prev: None }]);
        assert!(check(&bad, 1, &[], &[]).unwrap_err().0.contains("does not match"));
    }
}
