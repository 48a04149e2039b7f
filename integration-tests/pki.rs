//! Certificates generated at test time with rcgen: a CA and the leaf certificates it signs,
//! written as PEM files the way kubeadm lays them out.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, in PEM.
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate, DER (to compare with what a server presents).
    pub der: Vec<u8>,
}

/// The PEM files of one party: its CA bundle, certificate and key.
#[derive(Clone)]
pub struct Files {
    /// The CA that signed everything.
    pub ca: PathBuf,
    /// This party's certificate.
    pub cert: PathBuf,
    /// This party's key.
    pub key: PathBuf,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        Ca { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for both server and client use, for `cn` with the given subject
    /// alternative names (IP addresses or DNS names).
    pub fn leaf(&self, cn: &str, sans: &[&str]) -> Leaf {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// Writes `dir/ca.crt` and `dir/NAME.crt`, `dir/NAME.key` for a new leaf; see [`Ca::leaf`].
    pub fn issue(&self, dir: &Path, name: &str, sans: &[&str]) -> (Files, Leaf) {
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, self.pem()).unwrap();
        let leaf = self.leaf(name, sans);
        let files = Files { ca, cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
        files.replace(&leaf);
        (files, leaf)
    }
}

impl Files {
    /// Replaces the certificate and key the way a Secret update or cert-manager does: each file
    /// written beside and renamed over the old one.
    pub fn replace(&self, leaf: &Leaf) {
        for (path, pem) in [(&self.cert, &leaf.cert_pem), (&self.key, &leaf.key_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }

    /// Runs `etcdctl` presenting these files (`--cacert`, `--cert`, `--key`), whatever its outcome.
    pub fn etcdctl(&self, endpoint: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let flags = [("cacert", &self.ca), ("cert", &self.cert), ("key", &self.key)].map(|(f, p)| format!("--{f}={}", p.display()));
        let all: Vec<&str> = flags.iter().map(String::as_str).chain(args.iter().copied()).collect();
        crate::harness::etcdctl_output(endpoint, &all, stdin)
    }
}
