//! `etcd-squeeze get KEY | --prefix P`: what etcd really holds for a key, for an operator
//! debugging it: the decoded value, or with `--meta` the frame's header and sizes.

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;

use super::{human, key_string, Etcd, EtcdArgs, KeyRange, OpsError, PrefixArgs, DEFAULT_PAGE_KEYS};
use crate::codec::frame;
use crate::proto::etcdserverpb::RangeRequest;
use crate::proto::mvccpb::KeyValue;

/// `etcd-squeeze get`
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// How to reach etcd.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The key to read.
    #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
    pub key: Option<String>,
    /// Read every key under this prefix instead (printed as key, then value, one per line).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Print the frame metadata (frame version, codec, dictionary ID or delta base, stored and original size)
    /// instead of the value.
    #[arg(long)]
    pub meta: bool,
    /// Read at this revision; 0 = the latest.
    #[arg(long, default_value_t = 0)]
    pub revision: i64,
}

/// What etcd holds for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The key (escaped when not UTF-8).
    pub key: String,
    /// Revision of the last write to the key.
    pub mod_revision: i64,
    /// Lease attached to the key; 0 = none.
    pub lease: i64,
    /// Bytes etcd stores.
    pub stored: u64,
    /// The frame header; `None` for a value stored as it is.
    pub frame: Option<FrameMeta>,
    /// Bytes of the original value; `None` when it cannot be decoded.
    pub original: Option<u64>,
    /// Why the frame cannot be decoded.
    pub error: Option<String>,
    /// For a delta-frame base record (`/etcd-squeeze/bases/…`): the key whose versions use it.
    pub base_of: Option<String>,
}

/// A frame header as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameMeta {
    /// Frame format version.
    pub version: u8,
    /// `raw`, `zstd` or `delta`.
    pub codec: String,
    /// zstd dictionary ID; 0 = none.
    pub dictionary_id: u32,
    /// A delta frame's base: its etcd key (`/etcd-squeeze/bases/…`).
    pub base: Option<String>,
}

/// Runs `get` and prints to stdout; the exit code for `main` (1 when a key is missing or a
/// frame cannot be decoded).
pub async fn cli(args: GetArgs) -> ExitCode {
    let result = async {
        let etcd = args.etcd.connect(&PrefixArgs::default()).await?;
        let mut stdout = std::io::stdout().lock();
        let ok = run(&etcd, &args, &mut stdout).await?;
        stdout.flush()?;
        Ok::<_, OpsError>(ok)
    };
    match result.await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => super::fail("get", &e),
    }
}

/// Reads the key (or every key under the prefix) and writes values or metadata to `out`.
/// Returns false when the key does not exist or a value could not be decoded (reported on
/// stderr), true otherwise.
pub async fn run(etcd: &Etcd, args: &GetArgs, out: &mut impl Write) -> Result<bool, OpsError> {
    let kvs = match (&args.key, &args.prefix) {
        (Some(key), _) => {
            let request = RangeRequest { key: Bytes::from(key.clone()), revision: args.revision, ..Default::default() };
            let r = etcd.range(request, || format!("Range {key:?} at revision {}", args.revision)).await?;
            if r.kvs.is_empty() {
                eprintln!("etcd-squeeze get: {}: no such key", key_string(key.as_bytes()));
                return Ok(false);
            }
            r.kvs
        }
        (None, Some(prefix)) => {
            let range = KeyRange::of_prefix(prefix.as_bytes());
            // Pin the revision of the first answer, so the listing is one consistent read.
            let (_, revision) = etcd.count(&range, &range.start, args.revision).await?;
            let mut pager = etcd.pager(&range, range.start.to_vec(), revision, DEFAULT_PAGE_KEYS).including_reserved();
            let mut kvs = Vec::new();
            while let Some(page) = pager.next_page().await? {
                kvs.extend(page);
            }
            kvs
        }
        (None, None) => return Err(OpsError::Usage("give a KEY or --prefix".into())),
    };
    let mut ok = true;
    for kv in &kvs {
        if args.meta {
            let m = meta(etcd, kv);
            ok &= m.error.is_none();
            writeln!(out, "{m}")?;
            continue;
        }
        match etcd.decode(&kv.key, &kv.value) {
            Ok(value) if args.prefix.is_none() => out.write_all(&value)?,
            Ok(value) => {
                out.write_all(&kv.key)?;
                out.write_all(b"\n")?;
                out.write_all(&value)?;
                out.write_all(b"\n")?;
            }
            Err(e) => {
                eprintln!("etcd-squeeze get: {e}");
                ok = false;
            }
        }
    }
    Ok(ok)
}

/// The metadata of one stored key-value: frame header, sizes, decode error.
pub fn meta(etcd: &Etcd, kv: &KeyValue) -> Meta {
    let mut m = Meta {
        key: key_string(&kv.key),
        mod_revision: kv.mod_revision,
        lease: kv.lease,
        stored: kv.value.len() as u64,
        frame: None,
        original: None,
        error: None,
        base_of: kv
            .key
            .starts_with(crate::codec::delta::BASES_PREFIX)
            .then(|| crate::codec::delta::record_key(&kv.value).map(key_string))
            .flatten(),
    };
    if frame::is_framed(&kv.value) {
        match frame::parse(&kv.value) {
            Ok(f) => {
                let base = f.base.map(|b| key_string(&crate::codec::delta::base_key(&kv.key, b.id)));
                m.frame = Some(FrameMeta { version: f.version, codec: f.codec.to_string(), dictionary_id: f.dictionary_id, base })
            }
            Err(e) => m.error = Some(e.to_string()),
        }
    }
    match etcd.decode(&kv.key, &kv.value) {
        Ok(v) => m.original = Some(v.len() as u64),
        Err(e) => m.error = Some(e.reason.to_string()),
    }
    m
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.key)?;
        match &self.frame {
            Some(h) => {
                write!(f, "frame version {}, codec {}, dictionary {}", h.version, h.codec, h.dictionary_id)?;
                if let Some(base) = &h.base {
                    write!(f, ", base {base}")?;
                }
            }
            None if self.base_of.is_some() => write!(f, "delta-frame base record of {}", self.base_of.as_deref().unwrap_or_default())?,
            None if self.error.is_some() => write!(f, "invalid frame header")?,
            None => write!(f, "not framed (stored as it is)")?,
        }
        write!(f, ", stored {}", exact(self.stored))?;
        if let Some(original) = self.original {
            write!(f, ", original {}", exact(original))?;
            if let Some(h) = &self.frame {
                write!(f, ", {:.1}x", original as f64 / self.stored.max(1) as f64)?;
                if h.base.is_some() {
                    write!(f, " (the delta frame alone; its base is stored once for many versions)")?;
                }
            }
        }
        write!(f, ", mod_revision {}", self.mod_revision)?;
        if self.lease != 0 {
            write!(f, ", lease {:x}", self.lease)?;
        }
        if let Some(e) = &self.error {
            write!(f, ", CANNOT DECODE: {e}")?;
        }
        Ok(())
    }
}

/// `639 B`, or `6.9 KiB (7111 B)`: readable, and exact for comparisons.
fn exact(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{} ({bytes} B)", human(bytes))
    }
}
