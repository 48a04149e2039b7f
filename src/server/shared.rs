//! The state every request of one proxy shares: the validated config, the value codec, the
//! dictionaries and the delta-frame state.

use std::sync::Arc;

use crate::classify::Scope;
use crate::codec::ValueCodec;
use crate::config::Config;
use crate::delta::cache::BaseCache;
use crate::dictionary::{cache::DictionaryCache, Dictionaries};
use crate::upstream::Upstream;

/// State shared by every request: the validated config, the value codec and its dictionaries.
#[derive(Debug)]
pub struct Shared {
    /// The configuration the proxy started with.
    pub config: Config,
    /// Prefix rules, limits and the dictionary cache.
    pub codec: ValueCodec,
    /// Loads the dictionaries responses need, samples Puts, follows the store, trains.
    pub dictionaries: Arc<Dictionaries>,
    /// Delta frames: which base each write uses, loading bases for reads.
    pub deltas: Arc<crate::delta::Deltas>,
    /// The prefixes that send a KV or Watch call down the rewrite road (`crate::classify`).
    pub scope: Scope,
}

impl Shared {
    /// Builds the shared state from a validated config; dictionaries and bases are read from
    /// `upstream` with the proxy's own credentials ([`Upstream::own`]).
    pub fn new(config: Config, upstream: Upstream) -> Arc<Self> {
        let upstream = upstream.own();
        let dictionary_cache = Arc::new(DictionaryCache::new());
        let codec = ValueCodec::from_config(&config).with_dictionaries(dictionary_cache.clone());
        let base_cache = Arc::new(BaseCache::for_rules(codec.rules()));
        let codec = codec.with_bases(base_cache.clone());
        let dictionaries = Dictionaries::new(&config, codec.clone(), dictionary_cache, upstream.clone());
        let codecs = config.announce_codecs.clone().unwrap_or_else(|| crate::members::CODECS.iter().map(|c| c.to_string()).collect());
        let prefixes = config.prefixes.iter().map(|p| (p.prefix.clone(), p.delta_mode())).collect();
        let members = crate::members::Members::new(dictionaries.identity().to_string(), codecs, prefixes);
        let deltas = crate::delta::Deltas::new(codec.clone(), base_cache, upstream, dictionaries.clone(), members);
        let scope = Scope::new(codec.rules().iter().map(|r| (r.prefix.clone(), r.delta.is_some())));
        Arc::new(Shared { config, codec, dictionaries, deltas, scope })
    }

    /// A gRPC server codec bounded by `limits.max_request_bytes` for what it decodes, unbounded
    /// for what it encodes (etcd already bounded it).
    pub fn grpc<C: tonic::codec::Codec>(&self, codec: C) -> tonic::server::Grpc<C> {
        let max_decoding = self.config.limits.max_request_bytes.as_u64() as usize;
        tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(max_decoding), Some(usize::MAX))
    }
}
