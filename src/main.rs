//! The `etcd-squeeze` binary: `serve`, `analyze`, `migrate`, `get`, `dict`, `corpus generate`, `demo`,
//! `completions`, `man`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use etcd_squeeze::config::{Config, LogFormat};
use etcd_squeeze::ops;

#[derive(Parser)]
#[command(name = "etcd-squeeze", version = etcd_squeeze::VERSION, about = "A transparent compressing proxy for etcd")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the etcd v3 gRPC API, forwarding to etcd and compressing values under the configured prefixes.
    Serve(ServeArgs),
    /// Realistic FlyteWorkflow objects, as kube-apiserver stores them.
    Corpus {
        #[command(subcommand)]
        command: CorpusCommand,
    },
    /// Write realistic FlyteWorkflow objects through a running proxy, read them back and print the savings
    /// (the driver behind scripts/demo).
    Demo(DemoArgs),
    /// Read-only report of every value under the prefixes and what the proxy would store instead
    /// (talks to etcd directly; run it before installing the proxy).
    Analyze(ops::analyze::AnalyzeArgs),
    /// Rewrite the values already in etcd: `compress` to adopt the proxy, `decompress` to remove it
    /// (talks to etcd directly; a dry run unless --yes).
    Migrate {
        #[command(subcommand)]
        command: ops::migrate::MigrateCommand,
    },
    /// Read a key (or --prefix) directly from etcd: the decoded value, or with --meta the frame metadata.
    Get(ops::get::GetArgs),
    /// The etcd-squeeze replicas sharing etcd, the frame codecs each reads, and which frames each
    /// prefix writes now (talks to etcd directly).
    Status(etcd_squeeze::ops::status::StatusArgs),
    /// Trained dictionaries stored in etcd: list, show, train, gc.
    Dict {
        #[command(subcommand)]
        command: etcd_squeeze::ops::dict::DictCommand,
    },
    /// Print a shell completion script, e.g. `etcd-squeeze completions bash > /etc/bash_completion.d/etcd-squeeze`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `etcd-squeeze man > /usr/local/share/man/man1/etcd-squeeze.1`.
    Man,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The configuration file and how to reach etcd, as the operator commands take them.
    #[command(flatten)]
    etcd: etcd_squeeze::cli::EtcdArgs,
    /// Compressed key prefixes.
    #[command(flatten)]
    prefixes: etcd_squeeze::cli::PrefixArgs,
    /// Listen address, overriding server.listen.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of /metrics, /healthz and /readyz, overriding metrics.listen.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Validate the configuration and load its TLS files, print it, and exit.
    #[arg(long)]
    check_config: bool,
    /// Announce reading only these frame codecs (raw, zstd, delta), as an older build would:
    /// for upgrade tests.
    #[arg(long, value_delimiter = ',', hide = true)]
    announce_codecs: Option<Vec<String>>,
}

#[derive(Subcommand)]
enum CorpusCommand {
    /// Write the standard set of generated objects (a few KB to ~4 MB) and an update series into DIR.
    Generate {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Seed: the same seed gives byte-identical files.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct DemoArgs {
    /// The proxy's client URL.
    #[arg(long)]
    proxy: String,
    /// etcd's own client URL (to measure what is stored).
    #[arg(long)]
    etcd: String,
    /// Use the JSON objects of this directory instead of generated ones.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A second etcd (no proxy) that gets the same writes as plain values, to compare the two
    /// etcd databases (scripts/demo starts one).
    #[arg(long)]
    reference_etcd: Option<String>,
}

fn load_config(args: &ServeArgs) -> Result<Config, etcd_squeeze::config::ConfigError> {
    let mut config = args.etcd.load(&args.prefixes.prefixes)?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = listen;
    }
    config.announce_codecs = args.announce_codecs.clone();
    config.validate()?;
    Ok(config)
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // Colours only on a terminal: journald, kubectl logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C). The handlers are installed
/// before the server starts, so a signal that arrives during start-up is not lost.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
            tracing::info!(signal = name, "signal received");
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

async fn serve(args: ServeArgs) -> ExitCode {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("etcd-squeeze: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        if let Err(e) = etcd_squeeze::server::check(&config) {
            eprintln!("etcd-squeeze: {e}");
            return ExitCode::from(2);
        }
        use std::io::Write;
        // A closed stdout (`| head`) is not an error worth a panic.
        let effective = toml::to_string_pretty(&config).unwrap_or_else(|e| format!("# cannot print as TOML: {e}\n"));
        let _ = writeln!(std::io::stdout(), "# the effective configuration (file, flags and defaults)\n{effective}\n# configuration OK");
        return ExitCode::SUCCESS;
    }
    if config.prefixes.is_empty() {
        eprintln!("etcd-squeeze: warning: no [[prefixes]]: nothing is compressed, and frames already stored are returned as stored bytes; keep a prefix with compress = false until its values are decompressed");
    }
    init_tracing(&config);
    let signal = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("etcd-squeeze: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    match etcd_squeeze::server::start(config, signal).await {
        Ok(running) => match running.serve.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("etcd-squeeze: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> ExitCode {
    use etcd_squeeze::{corpus, demo};
    let objects = match demo::load_objects(args.corpus.as_deref(), args.seed) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("etcd-squeeze demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let series = if args.corpus.is_some() { Vec::new() } else { corpus::update_series(&corpus::Scenario::demo_series(), 20, args.seed) };
    let population = demo::training_population(args.corpus.is_some().then_some(&objects[..]), args.seed);
    let which = if args.corpus.is_some() { "the corpus's" } else { "other" };
    println!("writing {} {which} workflows through the proxy at {} and training a shared dictionary from them...", population.len(), args.proxy);
    match demo::train_dictionary(&args.proxy, &args.etcd, &population).await {
        Ok((_, line)) => println!("{line}"),
        Err(e) => {
            eprintln!("etcd-squeeze demo: dictionary: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("writing {} objects{} through the proxy at {} the way kube-apiserver does...", objects.len(),
        if series.is_empty() { String::new() } else { format!(" and a {}-version update series", series.len()) }, args.proxy);
    let (written_objects, written_series) = (objects.clone(), series.clone());
    match demo::run(&args.proxy, &args.etcd, objects, series).await {
        Ok(rows) => {
            println!("every object read back byte-identical through the proxy; stored bytes read directly from etcd at {}:\n", args.etcd);
            print!("{}", demo::table(&rows));
            let mib = |b: i64| b as f64 / (1 << 20) as f64;
            if let Ok(size) = demo::db_size(&args.etcd).await {
                match &args.reference_etcd {
                    Some(reference) => match demo::write_reference(reference, &population, &written_objects, &written_series).await {
                        Ok(refused) => match demo::db_size(reference).await {
                            Ok(plain) => {
                                println!(
                                    "\netcd database size: {:.1} MiB through the proxy; {:.1} MiB for the same writes straight to etcd \
                                     (bbolt grows in steps: small differences mean nothing)",
                                    mib(size),
                                    mib(plain)
                                );
                                if refused > 0 {
                                    println!("straight to etcd, {refused} of those writes were refused as too large (etcd's 1.5 MiB --max-request-bytes): only the proxy stores them");
                                }
                            }
                            Err(e) => eprintln!("etcd-squeeze demo: reference etcd: {e}"),
                        },
                        Err(e) => eprintln!("etcd-squeeze demo: reference etcd: {e}"),
                    },
                    None => println!("\netcd database size: {:.1} MiB", mib(size)),
                }
            }
            if args.corpus.is_some() {
                return ExitCode::SUCCESS;
            }
            let delta_series = vec![
                ("dynamic-n2000-consecutive".to_string(), corpus::consecutive_writes(&corpus::Scenario::new(corpus::Topology::Dynamic { children: 2000 }, 100, 40), 20, args.seed)),
                ("dynamic-n20000-consecutive".to_string(), corpus::consecutive_writes(&corpus::Scenario::new(corpus::Topology::Dynamic { children: 20000 }, 500, 40), 20, args.seed)),
                ("dynamic-n2000-create-to-done".to_string(), corpus::update_series(&corpus::Scenario::new(corpus::Topology::Dynamic { children: 2000 }, 100, 0), 20, args.seed)),
            ];
            println!("\ndelta frames alone (prefixes[].delta = true, dictionaries off): the same kind of history written through a second proxy \
                that stores each version as a delta against a base, 20 versions per series, every version read back byte-identical \
                at its own revision; bytes read directly from etcd (bases: count in parentheses):\n");
            match demo::run_delta(&args.etcd, delta_series).await {
                Ok(rows) => print!("{}", demo::delta_table(&rows)),
                Err(e) => {
                    eprintln!("etcd-squeeze demo: delta frames: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("etcd-squeeze demo: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "etcd-squeeze", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(command).render(&mut std::io::stdout()) {
                // `| head` closing the pipe is not a failure.
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("etcd-squeeze man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(args) => serve(args).await,
        Command::Corpus { command: CorpusCommand::Generate { out, seed } } => match etcd_squeeze::corpus::write_dir(&out, seed) {
            Ok(paths) => {
                println!("wrote {} objects to {}", paths.len(), out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("etcd-squeeze: corpus generate: {}: {e}", out.display());
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => demo(args).await,
        Command::Analyze(args) => ops::analyze::cli(args).await,
        Command::Migrate { command } => ops::migrate::cli(command).await,
        Command::Get(args) => ops::get::cli(args).await,
        Command::Status(args) => etcd_squeeze::ops::status::cli(args).await,
        Command::Dict { command } => etcd_squeeze::ops::dict::run(command).await,
    }
}
