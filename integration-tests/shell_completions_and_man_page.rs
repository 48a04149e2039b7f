//! Shell completions and the man page come from the clap definitions of the real binary: every
//! subcommand is in them, the bash script parses, the man page is roff with every subcommand.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_etcd-squeeze")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_and_man_page_cover_every_subcommand() {
    let subcommands = ["serve", "analyze", "migrate", "get", "dict", "corpus", "demo", "completions", "man"];
    let bash = run(&["completions", "bash"]);
    for s in subcommands {
        assert!(bash.contains(s), "bash completion lacks {s}");
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("etcd-squeeze.bash");
    std::fs::write(&script, &bash).unwrap();
    let check = Command::new("bash").arg("-n").arg(&script).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));
    for shell in ["zsh", "fish"] {
        assert!(run(&["completions", shell]).contains("etcd-squeeze"), "{shell}");
    }
    let man = run(&["man"]);
    assert!(man.contains(".TH etcd-squeeze 1"), "{man:.300}");
    for s in subcommands {
        assert!(man.contains(&format!("etcd\\-squeeze\\-{s}")) || man.contains(s), "man page lacks {s}");
    }
    assert!(man.contains(etcd_squeeze::VERSION.split(' ').next().unwrap()), "the man page names the version");
}
