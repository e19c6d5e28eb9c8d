//! RSA key pairs made by `openssl`, in every PEM form, shared by all tests of one test binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use jsonwebtoken::{DecodingKey, EncodingKey};

/// A key pair on disk in every PEM form.
#[derive(Clone, Debug)]
pub struct KeyPair {
    /// PKCS#8 `BEGIN PRIVATE KEY`.
    pub pkcs8: PathBuf,
    /// PKCS#1 `BEGIN RSA PRIVATE KEY`.
    pub pkcs1: PathBuf,
    /// SPKI `BEGIN PUBLIC KEY`.
    pub spki: PathBuf,
    /// PKCS#1 `BEGIN RSA PUBLIC KEY`.
    pub pkcs1_pub: PathBuf,
}

impl KeyPair {
    pub fn encoding(&self) -> EncodingKey {
        EncodingKey::from_rsa_pem(&std::fs::read(&self.pkcs8).unwrap()).unwrap()
    }
    pub fn decoding(&self) -> DecodingKey {
        DecodingKey::from_rsa_pem(&std::fs::read(&self.spki).unwrap()).unwrap()
    }
    pub fn public_pem(&self) -> Vec<u8> {
        std::fs::read(&self.spki).unwrap()
    }
}

/// Runs `openssl` with `args` and asserts it succeeded.
pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_pair(dir: &Path, name: &str) -> KeyPair {
    let p = |suffix: &str| dir.join(format!("{name}{suffix}"));
    let pair = KeyPair {
        pkcs8: p("-pri.pem"),
        pkcs1: p("-pri-pkcs1.pem"),
        spki: p("-pub.key"),
        pkcs1_pub: p("-pub-pkcs1.key"),
    };
    let s = |x: &PathBuf| x.to_str().unwrap().to_owned();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &s(&pair.pkcs8),
    ]);
    openssl(&[
        "rsa",
        "-in",
        &s(&pair.pkcs8),
        "-traditional",
        "-out",
        &s(&pair.pkcs1),
    ]);
    openssl(&[
        "rsa",
        "-in",
        &s(&pair.pkcs8),
        "-pubout",
        "-out",
        &s(&pair.spki),
    ]);
    openssl(&[
        "rsa",
        "-in",
        &s(&pair.pkcs8),
        "-RSAPublicKey_out",
        "-out",
        &s(&pair.pkcs1_pub),
    ]);
    pair
}

/// Key pairs shared by every test in one test binary (generating RSA keys is slow).
pub struct Keys {
    pub node: KeyPair,
    /// The node's event key (`event key create`), apart from its callback key.
    pub node_event: KeyPair,
    pub gateway: KeyPair,
    pub intruder: KeyPair,
    pub servers: Vec<KeyPair>,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        Keys {
            node: make_pair(&dir, "tss-node"),
            node_event: make_pair(&dir, "tss-node-event"),
            gateway: make_pair(&dir, "gateway"),
            intruder: make_pair(&dir, "intruder"),
            servers: (0..4).map(|i| make_pair(&dir, &format!("ds{i}"))).collect(),
        }
    })
}
