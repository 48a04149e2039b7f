//! `etcd-squeeze status`: the etcd-squeeze replicas sharing this etcd (their announcements under
//! `/etcd-squeeze/members/`), the frame codecs each reads, and which frames each configured
//! prefix writes now. Talks to etcd directly, like the other operator commands.

use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;

use super::{EtcdArgs, OpsError, PrefixArgs};
use crate::config::DeltaMode;
use crate::members::{Announcement, MEMBERS_PREFIX};
use crate::proto::etcdserverpb::RangeRequest;

/// `etcd-squeeze status`
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// How to reach etcd.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Which prefixes to report (default: the configured ones).
    #[command(flatten)]
    pub prefixes: PrefixArgs,
}

/// What `status` found.
#[derive(Debug, Clone)]
pub struct Status {
    /// Every announced replica, by identity.
    pub replicas: Vec<Announcement>,
    /// Per configured prefix: its `delta` setting and whether it writes delta frames now.
    pub prefixes: Vec<(String, DeltaMode, bool)>,
    /// etcd's compaction revision, if anything was compacted.
    pub compacted: Option<i64>,
}

impl Status {
    /// The revision below which no replica can still need a base (the lowest watch floor).
    pub fn horizon(&self) -> i64 {
        self.replicas.iter().map(|a| a.watch_floor).min().unwrap_or(0)
    }
}

/// Reads the announcements and the compaction revision.
pub async fn read(etcd: &super::Etcd) -> Result<Status, OpsError> {
    let end = crate::codec::prefix_end(MEMBERS_PREFIX.as_bytes()).expect("a prefix");
    let request = RangeRequest { key: Bytes::from_static(MEMBERS_PREFIX.as_bytes()), range_end: Bytes::from(end), ..Default::default() };
    let resp = etcd.range(request, || format!("Range {MEMBERS_PREFIX}")).await?;
    let replicas: Vec<Announcement> = resp
        .kvs
        .iter()
        .map(|kv| {
            let id = String::from_utf8_lossy(&kv.key[MEMBERS_PREFIX.len()..]).into_owned();
            serde_json::from_slice(&kv.value).unwrap_or(Announcement { id, version: "unreadable announcement".into(), codecs: Vec::new(), watch_floor: 0 })
        })
        .collect();
    let all_read_delta = !replicas.is_empty() && replicas.iter().all(|a| a.reads("delta"));
    let prefixes = etcd
        .config
        .prefixes
        .iter()
        .map(|p| {
            let mode = p.delta_mode();
            let writing = match mode {
                DeltaMode::Off => false,
                DeltaMode::On => true,
                DeltaMode::Auto => all_read_delta,
            };
            (p.prefix.clone(), mode, writing)
        })
        .collect();
    let compacted = crate::members::compaction_revision(etcd.upstream().clone()).await;
    Ok(Status { replicas, prefixes, compacted })
}

/// Prints `status` as text.
pub fn print(status: &Status, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "replicas announced under {MEMBERS_PREFIX}: {}", status.replicas.len())?;
    if !status.replicas.is_empty() {
        let width = status.replicas.iter().map(|a| a.id.len()).max().unwrap_or(2).max(2);
        writeln!(out, "  {:width$}  {:24}  {:16}  WATCH FLOOR", "ID", "VERSION", "READS")?;
        for a in &status.replicas {
            writeln!(out, "  {:width$}  {:24}  {:16}  {}", a.id, a.version, a.codecs.join(","), a.watch_floor)?;
        }
    }
    writeln!(out, "prefixes:")?;
    for (prefix, mode, writing) in &status.prefixes {
        let setting = match mode {
            DeltaMode::Off => "delta = false",
            DeltaMode::On => "delta = true",
            DeltaMode::Auto => "delta = \"auto\"",
        };
        let why = match (mode, writing) {
            (DeltaMode::Auto, true) => " (every announced replica reads them)",
            (DeltaMode::Auto, false) if status.replicas.is_empty() => " (no replica announced)",
            (DeltaMode::Auto, false) => " (a replica reads no delta frames)",
            _ => "",
        };
        let frames = if *writing { "delta frames" } else { "zstd frames" };
        writeln!(out, "  {prefix}  {setting}: writing {frames}{why}")?;
    }
    match status.compacted {
        Some(c) => writeln!(out, "compaction revision: {c}; superseded bases collectable below revision {}", status.horizon().min(c))?,
        None => writeln!(out, "compaction revision: none (nothing compacted): no superseded base is collectable")?,
    }
    Ok(())
}

/// Runs `etcd-squeeze status`.
pub async fn cli(args: StatusArgs) -> ExitCode {
    let result = async {
        let etcd = args.etcd.connect(&args.prefixes).await?;
        let status = read(&etcd).await?;
        let mut stdout = std::io::stdout().lock();
        print(&status, &mut stdout)?;
        stdout.flush()?;
        Ok::<_, OpsError>(())
    };
    match result.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("status", &e),
    }
}
