//! Training: a bounded reservoir of sampled values, zstd's trainer with a held-out evaluation,
//! and the election that lets one replica at a time train.
//!
//! [`train`] is a pure, CPU-bound function: the trainer runs it on a blocking thread
//! (`spawn_blocking`), never on the request path. The reservoir is filled from the request path
//! with one short, uncontended lock per sampled Put.

use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::watch;
use crate::config::MIN_SAMPLES;
use crate::upstream::Upstream;

use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::lease_client::LeaseClient;
use crate::proto::etcdserverpb::{
    compare, request_op, Compare, LeaseGrantRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};

/// Every `HOLDOUT_EVERY`-th sample is held out of training and used to compare dictionaries.
const HOLDOUT_EVERY: usize = 5;

/// A uniform sample of at most `capacity` values (reservoir sampling, algorithm R), each cut to
/// `max_bytes`: memory is bounded by `capacity × max_bytes` however many values are offered.
#[derive(Debug)]
pub struct Reservoir {
    capacity: usize,
    max_bytes: usize,
    seen: u64,
    samples: Vec<Bytes>,
}

impl Reservoir {
    /// An empty reservoir.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Reservoir { capacity, max_bytes, seen: 0, samples: Vec::new() }
    }

    /// Offers one value; it is copied (its first `max_bytes`) only when it is kept.
    pub fn offer(&mut self, value: &[u8], rng: &mut impl Rng) {
        self.seen += 1;
        let slot = if self.samples.len() < self.capacity {
            None
        } else {
            match rng.random_range(0..self.seen) as usize {
                j if j < self.capacity => Some(j),
                _ => return,
            }
        };
        let copy = Bytes::copy_from_slice(&value[..value.len().min(self.max_bytes)]);
        match slot {
            None => self.samples.push(copy),
            Some(j) => self.samples[j] = copy,
        }
    }

    /// The kept samples (cheap: reference-counted).
    pub fn samples(&self) -> Vec<Bytes> {
        self.samples.clone()
    }

    /// How many values were offered.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

/// A trained dictionary and how it did on the held-out samples.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The raw zstd dictionary (its dictID is set when published).
    pub raw: Vec<u8>,
    /// Samples it was trained on.
    pub samples: u64,
    /// Their total bytes.
    pub sample_bytes: u64,
    /// Held-out samples compressed with the current dictionary (or none), in bytes.
    pub heldout_before: u64,
    /// Held-out samples compressed with the candidate, in bytes.
    pub heldout_after: u64,
}

impl Candidate {
    /// The metadata of this candidate as a dictionary of `prefix` trained now at `level` by
    /// `trained_by` (ID, size and checksum are filled in when it is published).
    pub fn meta(&self, prefix: &str, level: i32, trained_by: &str) -> super::store::DictionaryMeta {
        super::store::DictionaryMeta {
            format: super::store::RECORD_FORMAT,
            prefix: prefix.into(),
            created_unix: super::store::unix_now(),
            samples: self.samples,
            sample_bytes: self.sample_bytes,
            level,
            heldout_before: self.heldout_before,
            heldout_after: self.heldout_after,
            trained_by: trained_by.into(),
            ..Default::default()
        }
    }

    /// Fraction of held-out bytes saved over the current dictionary: 0.2 = 20% smaller.
    pub fn gain(&self) -> f64 {
        1.0 - self.heldout_after as f64 / self.heldout_before.max(1) as f64
    }
}

/// Why no candidate was produced.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Not enough samples (from traffic and from etcd) to train.
    #[error("{have} samples, at least {need} are needed")]
    TooFewSamples {
        /// Samples found.
        have: usize,
        /// [`MIN_SAMPLES`].
        need: usize,
    },
    /// zstd's trainer or compressor failed.
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
}

/// Total compressed size of `samples`, one zstd frame each (checksum and content size, as the
/// codec writes them), at `level`, with `dictionary` if any.
pub fn compressed_size(samples: &[&Bytes], level: i32, dictionary: Option<&[u8]>) -> std::io::Result<u64> {
    let mut c = match dictionary {
        Some(d) => zstd::bulk::Compressor::with_dictionary(level, d)?,
        None => zstd::bulk::Compressor::new(level)?,
    };
    c.include_checksum(true)?;
    c.include_contentsize(true)?;
    let mut total = 0;
    for s in samples {
        total += c.compress(s)?.len() as u64;
    }
    Ok(total)
}

/// Trains a dictionary of at most `max_size` bytes on four fifths of `samples` and measures it
/// against `current` (or no dictionary) on the held-out fifth, at `level`. Deterministic.
pub fn train(samples: &[Bytes], max_size: usize, level: i32, current: Option<&[u8]>) -> Result<Candidate, TrainError> {
    if samples.len() < MIN_SAMPLES {
        return Err(TrainError::TooFewSamples { have: samples.len(), need: MIN_SAMPLES });
    }
    let held_out = |i: usize| i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1;
    let training: Vec<&Bytes> = samples.iter().enumerate().filter(|(i, _)| !held_out(*i)).map(|(_, s)| s).collect();
    let heldout: Vec<&Bytes> = samples.iter().enumerate().filter(|(i, _)| held_out(*i)).map(|(_, s)| s).collect();
    let sample_bytes: u64 = training.iter().map(|s| s.len() as u64).sum();
    // zstd wants ~10-100x more sample bytes than dictionary; never ask for more than a quarter.
    let size = max_size.min(sample_bytes as usize / 4).max(1024);
    let raw = zstd::dict::from_samples(&training, size)?;
    Ok(Candidate {
        samples: training.len() as u64,
        sample_bytes,
        heldout_before: compressed_size(&heldout, level, current)?,
        heldout_after: compressed_size(&heldout, level, Some(&raw))?,
        raw,
    })
}

/// The trainer election: whoever creates `key` (Txn on `create_revision == 0`) attached to its
/// lease leads until the lease ends, as in etcd's own election recipe. The lease is kept alive
/// while the leader lives; a killed leader's lease expires after the TTL and the key with it.
#[derive(Debug, Clone)]
pub struct Election {
    kv: KvClient<Upstream>,
    lease: LeaseClient<Upstream>,
    key: Bytes,
    ttl: Duration,
    identity: String,
}

/// Held leadership. Dropping it stops the keepalive (the lease then expires); [`Leadership::resign`]
/// revokes it at once.
#[derive(Debug)]
pub struct Leadership {
    /// The lease the election key is attached to.
    pub lease: i64,
    /// The election key's create_revision: the publish guard compares it.
    pub create_revision: i64,
    key: Bytes,
    lost: watch::Receiver<bool>,
    keepalive: tokio::task::JoinHandle<()>,
    client: LeaseClient<Upstream>,
}

impl Election {
    /// An election on `key` with leases of `ttl`; `identity` is written as the key's value.
    pub fn new(channel: Upstream, key: impl Into<Bytes>, ttl: Duration, identity: impl Into<String>) -> Self {
        Election { kv: KvClient::new(channel.clone()), lease: LeaseClient::new(channel), key: key.into(), ttl, identity: identity.into() }
    }

    /// Who leads now (the key's value), if anyone.
    pub async fn leader(&self) -> Result<Option<String>, tonic::Status> {
        let resp = self.kv.clone().range(RangeRequest { key: self.key.clone(), ..Default::default() }).await?.into_inner();
        Ok(resp.kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// One campaign round: leads if nobody does. `Ok(None)` when another replica leads.
    pub async fn try_acquire(&self) -> Result<Option<Leadership>, tonic::Status> {
        let ttl = self.ttl.as_secs().max(1) as i64;
        let lease = self.lease.clone().lease_grant(LeaseGrantRequest { ttl, id: 0 }).await?.into_inner().id;
        let txn = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: self.key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: self.key.clone(),
                    value: Bytes::from(self.identity.clone()),
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        let resp = match self.kv.clone().txn(txn).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                let _ = self.lease.clone().lease_revoke(LeaseRevokeRequest { id: lease }).await;
                return Err(e);
            }
        };
        if !resp.succeeded {
            self.lease.clone().lease_revoke(LeaseRevokeRequest { id: lease }).await?;
            return Ok(None);
        }
        let create_revision = resp.header.map_or(0, |h| h.revision);
        let (lost_tx, lost) = watch::channel(false);
        let keepalive = tokio::spawn(crate::members::keep_alive(self.lease.clone(), lease, self.ttl, lost_tx, "trainer election"));
        Ok(Some(Leadership { lease, create_revision, key: self.key.clone(), lost, keepalive, client: self.lease.clone() }))
    }
}

impl Leadership {
    /// The compare that holds only while this leadership does (the election key was created by
    /// this campaign and still exists): the guard of every publish.
    pub fn guard(&self) -> Compare {
        Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Create as i32,
            key: self.key.clone(),
            target_union: Some(compare::TargetUnion::CreateRevision(self.create_revision)),
            ..Default::default()
        }
    }

    /// True once the keepalive failed or the lease expired.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A receiver that turns true when the leadership is lost.
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Gives up the leadership now (revokes the lease, deleting the election key).
    pub async fn resign(self) -> Result<(), tonic::Status> {
        self.keepalive.abort();
        self.client.clone().lease_revoke(LeaseRevokeRequest { id: self.lease }).await.map(|_| ())
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn reservoir_is_bounded_and_uniform_enough() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut r = Reservoir::new(100, 8);
        for i in 0..10_000u32 {
            r.offer(format!("value-{i:05}-and-more").as_bytes(), &mut rng);
        }
        assert_eq!(r.seen(), 10_000);
        let s = r.samples();
        assert_eq!(s.len(), 100);
        assert!(s.iter().all(|v| v.len() == 8));
        // Kept values come from the whole stream, not only its start.
        let late = s.iter().filter(|v| v[7] >= b'5').count();
        assert!((25..=75).contains(&late), "{late}");
    }

    #[test]
    fn trained_dictionary_beats_none_on_small_objects() {
        let samples: Vec<Bytes> = crate::corpus::training_set(40, 1).into_iter().map(|g| Bytes::from(g.json)).collect();
        let c = train(&samples, 16 << 10, 3, None).unwrap();
        assert!(c.gain() > 0.3, "gain {:.2}: {} -> {}", c.gain(), c.heldout_before, c.heldout_after);
        assert!(c.raw.len() <= 16 << 10);
        // Against itself as the current dictionary there is nothing to gain.
        let again = train(&samples, 16 << 10, 3, Some(&c.raw)).unwrap();
        assert!(again.gain().abs() < 0.05, "{}", again.gain());
        assert!(matches!(train(&samples[..5], 1024, 3, None), Err(TrainError::TooFewSamples { have: 5, .. })));
    }
}
