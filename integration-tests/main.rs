//! Integration tests: a real etcd, the proxy on loopback, real clients (`etcd-client`, `etcdctl`).
//!
//! Every case of [`suite!`] runs five times: with the default configuration (the FlyteWorkflow
//! prefix, `delta = "auto"`: delta frames once the replica has announced itself), with delta
//! frames off for it, with a proxy that compresses every key (prefix ""), with delta frames on
//! (`true`, dictionaries off), and behind etcd authentication.

mod alerts;
mod auth;
mod client_port_http;
mod compaction_and_gc;
mod config_file;
mod corrupt_values;
mod dashboard;
mod delta;
mod deploy;
mod dictionary;
mod etcdctl;
mod faults;
mod harness;
mod history;
mod linearizability;
mod hostile;
mod http2_protocol_errors;
mod kv;
mod leases;
mod limits;
mod maintenance;
mod migration;
mod module_layers;
mod odd_values;
mod operator_commands_refuse_the_proxy;
mod orphaned_bases_are_swept;
mod ops;
mod pki;
mod ports_and_paths_agree;
mod put_options;
mod replicas_agree_on_delta_frames;
mod reserved_keys;
mod robustness;
mod several_proxies;
mod shell_completions_and_man_page;
mod soak;
mod tls;
mod txn_shapes;
mod unknown_fields;
mod upstream_failures;
mod watch;

/// Expands each listed `async fn(Env)` case into one test per prefix configuration.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod flyte_prefix {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::harness::Env::new(crate::harness::FLYTE).await).await;
                }
            )*
        }
        mod every_key {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::harness::Env::new("").await).await;
                }
            )*
        }
        /// The FlyteWorkflow prefix with delta frames off: every version stored on its own.
        mod delta_off {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::harness::Env::per_object(crate::harness::FLYTE).await).await;
                }
            )*
        }
        mod delta_frames {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::harness::Env::with_delta(crate::harness::FLYTE).await).await;
                }
            )*
        }
        /// etcd authentication on, clients as root, the proxy as its own user, delta frames on.
        mod etcd_auth {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::harness::Env::with_auth(crate::harness::AUTH_ROOT).await).await;
                }
            )*
        }
    };
}
pub(crate) use suite;
