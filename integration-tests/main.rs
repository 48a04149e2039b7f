//! Integration tests: a real etcd, the proxy on loopback, real clients (`etcd-client`, `etcdctl`).
//!
//! Every case of [`suite!`] runs three times: with the default FlyteWorkflow prefix, with a proxy
//! that compresses every key (prefix ""), and with delta frames on for the FlyteWorkflow prefix.

mod dashboard;
mod delta;
mod delta_attack;
mod delta_review2;
mod deploy;
mod dictionary;
mod faults;
mod harness;
mod history;
mod hostile;
mod kv;
mod migration;
mod module_layers;
mod ops;
mod other;
mod pki;
mod soak;
mod tls;
mod unknown_fields;
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
        mod delta_frames {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(crate::harness::Env::with_delta(crate::harness::FLYTE).await).await;
                }
            )*
        }
    };
}
pub(crate) use suite;
