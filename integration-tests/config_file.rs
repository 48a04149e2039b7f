//! The configuration file of the real binary: `serve --check-config` refuses an invalid file
//! naming the key, and accepts the shipped `config/etcd-squeeze.toml`.

/// An invalid config file fails at start with an error naming the key.
#[test]
fn invalid_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[prefixes]]\nprefix = \"/registry/x/\"\nlevel = 99\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(["serve", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prefixes[0].level"), "{err}");
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-squeeze"))
        .args(["serve", "--check-config", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/config/etcd-squeeze.toml")])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // It prints the effective configuration as TOML, which reads back as the same configuration.
    let printed = String::from_utf8(ok.stdout).unwrap();
    let again = etcd_squeeze::config::Config::parse(&printed, "printed").unwrap_or_else(|e| panic!("{e}\n{printed}"));
    again.validate().unwrap();
    let example = etcd_squeeze::config::Config::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/etcd-squeeze.toml"))).unwrap();
    assert_eq!(toml::to_string(&again).unwrap(), toml::to_string(&example).unwrap());
}
