//! Watch history checker: watchers that record every response they get (resuming from their
//! last revision + 1 after an error), writers that record every acknowledged write, and an
//! offline check of etcd's watch guarantees against a direct-etcd record of the same history.
//!
//! Checked per watcher: revisions ordered and unique across responses, all events of one
//! revision in one response (atomic), no key twice in one revision, `prev_kv` equal to the
//! previous event's value for that key, and the whole sequence (across resumptions) equal to the
//! direct record from the watcher's start revision: no gap, no duplicate, no altered value.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, TxnOpResponse, WatchOptions};
use etcd_squeeze::codec::ValueCodec;
use tokio::sync::Mutex;

use crate::linearizability::{hash, Change, Hash, Kv, Watched};

/// One event as seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ev {
    /// The event's `kv.mod_revision`.
    pub revision: i64,
    /// True for a PUT, false for a DELETE.
    pub put: bool,
    /// The key.
    pub key: Vec<u8>,
    /// The value (logical, decoded).
    pub value: Vec<u8>,
    /// `prev_kv.value` and `prev_kv.mod_revision`, when etcd sent one.
    pub prev: Option<(Vec<u8>, i64)>,
    /// The event's `kv.create_revision`, `kv.version` and `kv.lease` (zeros for a DELETE).
    pub meta: (i64, i64, i64),
}

/// What one watcher saw: its responses' events, one `Vec` per response, and how often it resumed.
#[derive(Default, Debug, Clone)]
pub struct Record {
    /// The revision the watcher started at.
    pub start: i64,
    /// Events, grouped by the response that carried them (empty responses left out).
    pub responses: Vec<Vec<Ev>>,
    /// Errors after which the watcher resumed.
    pub resumptions: usize,
    /// Progress notifications (bookmarks): `(responses.len() when it came, header revision)`.
    pub bookmarks: Vec<(usize, i64)>,
    /// Cancellations for compaction: `(responses.len() when it came, compact_revision)`; the
    /// watcher resumed at `compact_revision`, as etcd's contract allows (the gap is etcd's).
    pub compactions: Vec<(usize, i64)>,
    /// The highest compaction of the run, when the test compacts: etcd reads a watch event's
    /// prev_kv at the event's revision - 1 when it sends the event, and leaves it out when that
    /// revision was compacted meanwhile (a watcher catching up from the past meets this).
    pub compacted: i64,
}

impl Record {
    /// The last revision seen (or `start - 1`).
    pub fn last_revision(&self) -> i64 {
        self.responses.iter().rev().find_map(|r| r.last()).map_or(self.start - 1, |e| e.revision)
    }

    /// Where a resumed watch starts: after the last revision seen, or at the compaction that
    /// cancelled it.
    fn resume_at(&self) -> i64 {
        let after = self.last_revision() + 1;
        self.compactions.last().map_or(after, |&(_, c)| after.max(c))
    }
}

/// How a watcher behaves beyond recording.
#[derive(Clone, Copy, Debug, Default)]
pub struct WatchMode {
    /// Ask for etcd's timed progress notifications (bookmarks; etcd sends them when started with
    /// `--experimental-watch-progress-notify-interval`). Not requested ones: before etcd 3.4.25
    /// and 3.5.8 those race the stream's events (etcd-io/etcd#15220).
    pub progress: bool,
    /// Open the watch only after this long (a watcher that starts behind, from an old revision).
    pub delay: Duration,
    /// Sleep this long after each response while the writes go on (a slow consumer, lagging
    /// behind them; it catches up once the test sets `until`).
    pub lag: Duration,
}

fn event(e: &etcd_client::Event) -> Ev {
    let kv = e.kv().expect("an event carries a kv");
    Ev {
        revision: kv.mod_revision(),
        put: e.event_type() == EventType::Put,
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        prev: e.prev_kv().map(|p| (p.value().to_vec(), p.mod_revision())),
        meta: (kv.create_revision(), kv.version(), kv.lease()),
    }
}

/// A watcher on `prefix` (with `prev_kv`) from revision `start`, through `url`, recording into a
/// shared [`Record`]. On any error or end of stream it reconnects and resumes at the last seen
/// revision + 1, until the record reaches `until` (set by the test once writes stop) or `deadline`.
pub fn spawn_watcher(
    url: String,
    prefix: String,
    start: i64,
    until: Arc<std::sync::atomic::AtomicI64>,
    deadline: Instant,
) -> (Arc<Mutex<Record>>, tokio::task::JoinHandle<()>) {
    spawn_watcher_with(url, prefix, start, until, deadline, WatchMode::default())
}

/// [`spawn_watcher`] with bookmarks and lag ([`WatchMode`]); a watch cancelled by a compaction
/// resumes at the compact revision and says so in [`Record::compactions`].
pub fn spawn_watcher_with(
    url: String,
    prefix: String,
    start: i64,
    until: Arc<std::sync::atomic::AtomicI64>,
    deadline: Instant,
    mode: WatchMode,
) -> (Arc<Mutex<Record>>, tokio::task::JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    let record = Arc::new(Mutex::new(Record { start, ..Record::default() }));
    let rec = record.clone();
    let task = tokio::spawn(async move {
        let done = |last: i64| {
            let until = until.load(Ordering::SeqCst);
            until > 0 && last >= until
        };
        let mut first = true;
        tokio::time::sleep(mode.delay).await;
        loop {
            let (last, resume) = {
                let r = rec.lock().await;
                (r.last_revision(), r.resume_at())
            };
            if done(last) || Instant::now() > deadline {
                return;
            }
            if !first {
                rec.lock().await.resumptions += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            first = false;
            let mut opts = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(resume);
            if mode.progress {
                opts = opts.with_progress_notify();
            }
            let Ok(mut client) = etcd_client::Client::connect([&url], None).await else { continue };
            let Ok(mut stream) = client.watch(prefix.as_str(), Some(opts)).await else { continue };
            loop {
                let msg = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
                let resp = match msg {
                    Err(_) => {
                        if done(rec.lock().await.last_revision()) || Instant::now() > deadline {
                            return;
                        }
                        continue;
                    }
                    Ok(Ok(Some(resp))) => resp,
                    Ok(_) => break, // an error or the end: resume
                };
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        let mut r = rec.lock().await;
                        let at = r.responses.len();
                        r.compactions.push((at, resp.compact_revision()));
                    }
                    break;
                }
                let events: Vec<Ev> = resp.events().iter().map(event).collect();
                let mut r = rec.lock().await;
                if !events.is_empty() {
                    r.responses.push(events);
                } else if !resp.created() {
                    let at = r.responses.len();
                    r.bookmarks.push((at, resp.header().map_or(0, |h| h.revision())));
                }
                drop(r);
                if !mode.lag.is_zero() && until.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(mode.lag).await;
                }
            }
        }
    });
    (record, task)
}

/// Reads the whole history of `prefix` directly from etcd (a watch from revision 1 up to `until`,
/// values decoded by `codec`): the reference the watchers are compared with.
pub async fn direct_history(direct_url: &str, prefix: &str, until: i64, codec: &ValueCodec) -> Vec<Ev> {
    let mut client = etcd_client::Client::connect([direct_url], None).await.unwrap();
    let opts = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(1);
    let mut stream = client.watch(prefix, Some(opts)).await.unwrap();
    let mut out: Vec<Ev> = Vec::new();
    while out.last().is_none_or(|e| e.revision < until) {
        let resp = tokio::time::timeout(Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
        for e in resp.events() {
            let mut ev = event(e);
            let decode = |v: &[u8]| codec.decode(&ev.key, &bytes::Bytes::copy_from_slice(v)).unwrap().to_vec();
            ev.value = decode(&ev.value);
            ev.prev = ev.prev.take().map(|(v, r)| (decode(&v), r));
            out.push(ev);
        }
    }
    out
}

/// Checks the guarantees one watcher's record carries on its own: *ordered* (revisions increase
/// across responses), *unique* (no key twice in one revision, no revision twice), *atomic* (all
/// events of a revision in one response), *bookmarkable* (a progress notification at revision b
/// comes after every event ≤ b and before every event > b) and `prev_kv` equal to the previous
/// event's kv of that key (forgotten across a compaction gap). Returns the violations.
pub fn structure(name: &str, record: &Record) -> Vec<String> {
    let mut out = Vec::new();
    let mut last_rev = record.start - 1;
    let mut latest: HashMap<&[u8], (&[u8], i64)> = HashMap::new();
    for (i, resp) in record.responses.iter().enumerate() {
        if record.compactions.iter().any(|&(at, _)| at == i) {
            latest.clear();
        }
        let first = &resp[0];
        if first.revision <= last_rev {
            out.push(format!("{name}: ordered/atomic: response {i} starts at revision {} after revision {last_rev}: duplicate, reordered or split revision", first.revision));
        }
        let mut in_rev: Vec<&[u8]> = Vec::new();
        let mut rev = first.revision;
        for e in resp {
            if e.revision < rev {
                out.push(format!("{name}: ordered: revisions go backwards inside response {i}"));
            }
            if e.revision != rev {
                in_rev.clear();
                rev = e.revision;
            }
            if in_rev.contains(&&e.key[..]) {
                out.push(format!("{name}: unique: key {:?} twice in revision {rev}", String::from_utf8_lossy(&e.key)));
            }
            in_rev.push(&e.key);
            if let Some((value, mod_rev)) = latest.get(&e.key[..]) {
                let right = match &e.prev {
                    Some((pv, pr)) => pv[..] == value[..] && pr == mod_rev,
                    None => (value.is_empty() && *mod_rev == 0) || e.revision - 1 < record.compacted,
                };
                if !right {
                    out.push(format!("{name}: prev_kv of {:?} at revision {rev} is not the previous event's kv (revision {mod_rev})", String::from_utf8_lossy(&e.key)));
                }
            }
            latest.insert(&e.key, if e.put { (&e.value, e.revision) } else { (&[], 0) });
        }
        last_rev = resp.last().unwrap().revision;
    }
    for &(at, b) in &record.bookmarks {
        let before = record.responses[..at].iter().flatten().map(|e| e.revision).max();
        let after = record.responses[at..].iter().flatten().map(|e| e.revision).min();
        if before.is_some_and(|r| r > b) || after.is_some_and(|r| r <= b) {
            out.push(format!("{name}: bookmarkable: progress at revision {b} after an event at {before:?} or before one at {after:?}"));
        }
    }
    out
}

/// Checks one watcher's record against etcd's watch guarantees ([`structure`]) and against
/// `reference` (the direct history of the same prefix). Panics with the first violation.
pub fn check(name: &str, record: &Record, reference: &[Ev]) {
    let violations = structure(name, record);
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    let seen: Vec<&Ev> = record.responses.iter().flatten().collect();
    let expected: Vec<&Ev> = reference.iter().filter(|e| e.revision >= record.start).collect();
    assert_eq!(seen.len(), expected.len(), "{name}: saw {} events, etcd has {} from revision {}", seen.len(), expected.len(), record.start);
    for (s, x) in seen.iter().zip(&expected) {
        assert_eq!((s.revision, s.put, &s.key), (x.revision, x.put, &x.key), "{name}: event differs from etcd's history");
        assert!(s.value == x.value && s.prev == x.prev, "{name}: value or prev_kv of revision {} differs from etcd's", s.revision);
    }
}

/// One event in the terms of [`crate::linearizability`]: revision, key, the new kv (hashed;
/// `None` for a delete) and `prev_kv` as (value hash, mod_revision).
type ModelEvent = (i64, Vec<u8>, Option<(Hash, i64, i64, i64)>, Option<(Hash, i64)>);

fn model_event(e: &Ev) -> ModelEvent {
    let kv = e.put.then(|| (hash(&e.value), e.meta.0, e.meta.1, e.meta.2));
    (e.revision, e.key.clone(), kv, e.prev.as_ref().map(|(v, r)| (hash(v), *r)))
}

/// Checks one watcher's record against the linearization the checker found (`changes`, every
/// key the clients use), for the keys `watched` selects, up to revision `until`: the
/// [`structure`] guarantees, plus *reliable* and *resumable* — the events seen, across every
/// resumption, are exactly the linearization's changes from the watcher's start, values and
/// prev_kv included, except those a compaction cancelled the watch over (etcd's own gap: from
/// the last event seen to the compact revision). Returns the violations and the events checked.
pub fn check_with_model(name: &str, record: &Record, watched: impl Fn(&[u8]) -> bool, changes: &[Change], until: i64) -> (Vec<String>, usize) {
    let mut out = structure(name, record);
    let gaps: Vec<(i64, i64)> = record
        .compactions
        .iter()
        .map(|&(at, c)| (record.responses[..at].iter().flatten().map(|e| e.revision).max().unwrap_or(record.start - 1), c))
        .collect();
    let expected: Vec<ModelEvent> = changes
        .iter()
        .filter(|c| c.revision >= record.start && c.revision <= until && watched(&c.key))
        // A compaction keeps no tombstone at its own revision: a watch resumed there never sees
        // a DELETE made at exactly that revision (etcd's own gap, as the events before it).
        .filter(|c| !gaps.iter().any(|&(after, compact)| c.revision > after && (c.revision < compact || (c.revision == compact && c.kv.is_none()))))
        .map(|c| (c.revision, c.key.clone(), c.kv.map(|kv| (kv.value, kv.create_revision, kv.version, kv.lease)), c.prev.map(|p| (p.value, p.mod_revision))))
        .collect();
    let seen: Vec<ModelEvent> = record.responses.iter().flatten().filter(|e| e.revision <= until).map(model_event).collect();
    // etcd reads prev_kv at the event's revision - 1: a watch resumed at a compaction gets none
    // when that revision is compacted too.
    let compacted = record.compactions.iter().map(|&(_, c)| c).max().unwrap_or(0).max(record.compacted);
    let same = |s: &ModelEvent, x: &ModelEvent| s == x || (s.3.is_none() && x.3.is_some() && s.0 - 1 < compacted && s.0 == x.0 && s.1 == x.1 && s.2 == x.2);
    if let Some(i) = (0..seen.len().min(expected.len())).find(|&i| !same(&seen[i], &expected[i])) {
        let show = |e: &ModelEvent| format!("revision {} {} {:?} prev {:?}", e.0, String::from_utf8_lossy(&e.1), e.2, e.3);
        out.push(format!("{name}: reliable: event {i} is {}, the linearization has {}", show(&seen[i]), show(&expected[i])));
    } else if seen.len() != expected.len() {
        out.push(format!("{name}: reliable/resumable: saw {} events up to revision {until}, the linearization has {} from revision {}", seen.len(), expected.len(), record.start));
    }
    (out, seen.len())
}

/// The key states a watcher was shown (events and their prev_kv), for
/// [`crate::linearizability::check`] and [`crate::linearizability::altered_values`]; fields a
/// prev_kv event does not carry in [`Ev`] are zero.
pub fn seen_states(record: &Record) -> Vec<Kv> {
    let mut out = Vec::new();
    for e in record.responses.iter().flatten() {
        if e.put {
            out.push(Kv { value: hash(&e.value), create_revision: e.meta.0, mod_revision: e.revision, version: e.meta.1, lease: e.meta.2 });
        }
        if let Some((v, r)) = &e.prev {
            out.push(Kv { value: hash(v), create_revision: 0, mod_revision: *r, version: 0, lease: 0 });
        }
    }
    out
}

/// The changes `record`'s events showed, for [`crate::linearizability::check`].
pub fn watched_changes(record: &Record) -> Vec<Watched> {
    record.responses.iter().flatten().map(|e| Watched { revision: e.revision, key: e.key.clone(), value: e.put.then(|| hash(&e.value)) }).collect()
}

/// An acknowledged write: etcd (through the proxy) said `key` = `value` at `revision`.
#[derive(Clone, Debug)]
pub struct Ack {
    /// The key written.
    pub key: String,
    /// The value written.
    pub value: Vec<u8>,
    /// The revision of the write (the Txn's header revision).
    pub revision: i64,
}

/// A GuaranteedUpdate loop (kube-apiserver's pattern): read `key`, write a new value with a Txn
/// comparing `mod_revision`, on conflict use the Txn's Range, retry. Errors (the fault under
/// test) are counted and retried after a pause. Runs until `stop`; returns acknowledged writes
/// and the number of errors.
pub async fn guaranteed_updates(url: String, key: String, writer: usize, stop: Arc<std::sync::atomic::AtomicBool>) -> (Vec<Ack>, usize) {
    use std::sync::atomic::Ordering;
    let mut acks = Vec::new();
    let mut errors = 0;
    let mut client = loop {
        match etcd_client::Client::connect([&url], None).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut known: Option<i64> = None;
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let rev = match known {
            Some(r) => r,
            None => match client.get(key.as_str(), None).await {
                Ok(r) => r.kvs().first().map_or(0, |kv| kv.mod_revision()),
                Err(_) => {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        n += 1;
        let value = format!("{{\"writer\":{writer},\"n\":{n},\"spec\":\"{}\"}}", "workflow-node ".repeat(40)).into_bytes();
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key.as_str(), value.clone(), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        match tokio::time::timeout(Duration::from_secs(5), client.txn(txn)).await {
            Ok(Ok(resp)) if resp.succeeded() => {
                let revision = resp.header().unwrap().revision();
                acks.push(Ack { key: key.clone(), value, revision });
                known = Some(revision);
            }
            Ok(Ok(resp)) => {
                known = resp.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.mod_revision())),
                    _ => None,
                });
            }
            _ => {
                // Unknown outcome: the write may or may not have been applied. Re-read.
                errors += 1;
                known = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    (acks, errors)
}

/// Checks that every acknowledged write is in etcd's history at its revision with its value.
pub fn check_acks(acks: &[Ack], reference: &[Ev]) {
    let by_rev: HashMap<(i64, &[u8]), &Ev> = reference.iter().map(|e| ((e.revision, &e.key[..]), e)).collect();
    for a in acks {
        let e = by_rev.get(&(a.revision, a.key.as_bytes())).unwrap_or_else(|| panic!("acknowledged write of {} at revision {} is lost", a.key, a.revision));
        assert!(e.put && e.value == a.value, "acknowledged write of {} at revision {} has another value", a.key, a.revision);
    }
}

/// The checker itself rejects a gap, a duplicate, a split revision and a wrong prev_kv.
#[test]
fn checker_rejects_broken_histories() {
    let ev = |revision: i64, key: &str, value: &str, prev: Option<(&str, i64)>| Ev {
        revision,
        put: true,
        key: key.into(),
        value: value.into(),
        prev: prev.map(|(v, r)| (v.into(), r)),
        meta: (0, 0, 0),
    };
    let reference = vec![ev(2, "a", "1", None), ev(3, "a", "2", Some(("1", 2))), ev(3, "b", "1", None), ev(4, "b", "2", Some(("1", 3)))];
    let good = Record { start: 1, responses: vec![vec![reference[0].clone()], reference[1..].to_vec()], ..Record::default() };
    check("good", &good, &reference);
    let broken = |responses: Vec<Vec<Ev>>| std::panic::catch_unwind(|| check("broken", &Record { start: 1, responses, resumptions: 1, ..Record::default() }, &reference)).is_err();
    let r = &reference;
    assert!(broken(vec![vec![r[0].clone()], vec![r[2].clone(), r[3].clone()]]), "gap");
    assert!(broken(vec![vec![r[0].clone(), r[1].clone()], vec![r[1].clone(), r[2].clone(), r[3].clone()]]), "duplicate");
    assert!(broken(vec![vec![r[0].clone(), r[1].clone()], vec![r[2].clone(), r[3].clone()]]), "split revision");
    let mut wrong = r.clone();
    wrong[3].prev = Some(("0".into(), 3));
    assert!(broken(vec![wrong]), "wrong prev_kv");
    // A progress notification at revision 3 before the events of revision 3 (not bookmarkable).
    let early = Record { start: 1, responses: vec![vec![r[0].clone()], r[1..].to_vec()], bookmarks: vec![(1, 3)], ..Record::default() };
    assert!(!structure("early bookmark", &early).is_empty(), "bookmark before its events");
    let right = Record { bookmarks: vec![(2, 4)], ..early };
    assert!(structure("bookmark", &right).is_empty());
}
