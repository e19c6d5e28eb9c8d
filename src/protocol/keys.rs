//! RSA keys in the four PEM forms Cobo's tools write, parsed once into the values that sign and
//! verify.
//!
//! Parsing happens at load and reload only: a [`Signer`] or [`Verifier`] holds the key material
//! already decoded, so the request path never touches PEM or DER.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _, ParsedPublicKey};

/// Why a key file could not be used. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path}: not a PEM file: {detail}")]
    NotPem { path: PathBuf, detail: String },
    #[error("key file {path}: is DER, not PEM: convert it with `openssl pkey {pubin}-inform DER -in {path} -out {path}.pem` and point the config at the .pem file")]
    Der { path: PathBuf, pubin: &'static str },
    #[error("key file {path}: is {kind} key; callback tokens are RS256: use an RSA key (`tss-callback-gateway keygen` makes one)")]
    NotRsaKind { path: PathBuf, kind: &'static str },
    #[error("key file {path}: PEM block `{tag}` is not {expected}")]
    WrongKind {
        path: PathBuf,
        tag: String,
        expected: &'static str,
    },
    #[error("key file {path}: not a usable RSA key ({detail})")]
    NotRsa { path: PathBuf, detail: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating an RSA key failed")]
    Generate,
    #[error("--name {0:?}: use 1-64 characters of [A-Za-z0-9_-] (it becomes NAME-pri.pem and NAME-pub.key)")]
    Name(String),
    #[error(
        "{path} already exists: keygen never overwrites a key; choose another --name or --out"
    )]
    Exists { path: PathBuf },
}

/// Why a PEM file that is not an RSA key failed, as the error the operator should read:
/// another key type (found by its algorithm identifier in the DER), or the parser's reason.
fn not_rsa(path: &Path, der: &[u8], detail: impl fmt::Display) -> KeyError {
    match other_key_kind(der) {
        Some(kind) => KeyError::NotRsaKind {
            path: path.to_owned(),
            kind,
        },
        None => KeyError::NotRsa {
            path: path.to_owned(),
            detail: detail.to_string(),
        },
    }
}

/// The kind of a non-RSA key, from the object identifier of its algorithm in the DER (only
/// used to word an error: nothing is trusted on it).
fn other_key_kind(der: &[u8]) -> Option<&'static str> {
    // id-ecPublicKey 1.2.840.10045.2.1, id-Ed25519 1.3.101.112, id-Ed448 1.3.101.113.
    const KINDS: [(&[u8], &str); 3] = [
        (
            &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01],
            "an EC",
        ),
        (&[0x06, 0x03, 0x2b, 0x65, 0x70], "an Ed25519"),
        (&[0x06, 0x03, 0x2b, 0x65, 0x71], "an Ed448"),
    ];
    KINDS
        .iter()
        .find(|(oid, _)| der.windows(oid.len()).any(|w| w == *oid))
        .map(|(_, kind)| *kind)
}

/// The refusal of a file that does not parse as PEM: DER (binary, starting with an ASN.1
/// SEQUENCE) gets the command that converts it.
fn not_pem(path: &Path, bytes: &[u8], detail: impl fmt::Display, public: bool) -> KeyError {
    if bytes.first() == Some(&0x30) && std::str::from_utf8(bytes).is_err() {
        return KeyError::Der {
            path: path.to_owned(),
            pubin: if public { "-pubin " } else { "" },
        };
    }
    KeyError::NotPem {
        path: path.to_owned(),
        detail: detail.to_string(),
    }
}

/// The short fingerprint of a public key as logs and summaries show it: `sha256:` and the
/// first 16 hex digits of the SHA-256 of its SPKI DER (the audit checkpoints' `key_id`).
pub fn fingerprint(spki_der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki_der);
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// An RSA private key that signs RS256 (RSASSA-PKCS1-v1_5 with SHA-256). Cloning shares the key.
#[derive(Clone)]
pub struct Signer {
    key: Arc<KeyPair>,
    rng: SystemRandom,
}

/// An RSA public key that verifies RS256 signatures, parsed once.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<ParsedPublicKey>,
    /// Each key's [`fingerprint`], in file order.
    fingerprints: Vec<String>,
}

// === impl Signer ===

impl Signer {
    /// Loads a private key from a PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`)
    /// PEM file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Signer::from_pem(path, &read(path)?)
    }

    /// Parses `bytes`, the content of the PEM file at `path` (named in errors).
    pub fn from_pem(path: &Path, bytes: &[u8]) -> Result<Self, KeyError> {
        let block = pem::parse(bytes).map_err(|e| not_pem(path, bytes, e, false))?;
        let key = match block.tag() {
            "PRIVATE KEY" => KeyPair::from_pkcs8(block.contents()),
            "RSA PRIVATE KEY" => KeyPair::from_der(block.contents()),
            "EC PRIVATE KEY" => {
                return Err(KeyError::NotRsaKind {
                    path: path.to_owned(),
                    kind: "an EC",
                })
            }
            other => {
                return Err(KeyError::WrongKind {
                    path: path.to_owned(),
                    tag: other.to_owned(),
                    expected: "`PRIVATE KEY` or `RSA PRIVATE KEY`",
                })
            }
        }
        .map_err(|e| not_rsa(path, block.contents(), e))?;
        Ok(Self::from_key_pair(key))
    }

    fn from_key_pair(key: KeyPair) -> Self {
        Signer {
            key: Arc::new(key),
            rng: SystemRandom::new(),
        }
    }

    /// Signs `message` with RS256 and returns the raw signature.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; self.key.public_modulus_len()];
        // Signing with a key that loaded can only fail if the system RNG fails (RSA blinding);
        // an empty signature then simply fails verification on the other side: fail closed.
        if self
            .key
            .sign(&signature::RSA_PKCS1_SHA256, &self.rng, message, &mut sig)
            .is_err()
        {
            sig.clear();
        }
        sig
    }

    /// The matching public key as SPKI DER (`BEGIN PUBLIC KEY` contents), as audit checkpoints
    /// carry it.
    pub(crate) fn public_spki_der(&self) -> Vec<u8> {
        // The public half of a key pair that loaded always encodes.
        self.key
            .public_key()
            .as_der()
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default()
    }

    /// The [`fingerprint`] of the matching public key.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_spki_der())
    }

    /// The matching public key, for tests and the demo.
    pub fn verifier(&self) -> Verifier {
        let der = self.key.public_key().as_ref().to_vec();
        Verifier {
            fingerprints: vec![self.fingerprint()],
            // The public half of a key pair that loaded is always a valid RSA public key.
            keys: vec![
                ParsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, der)
                    .expect("public half of a loaded RSA key pair"),
            ],
        }
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer(RSA-{})", self.key.public_modulus_len() * 8)
    }
}

// === impl Verifier ===

impl Verifier {
    /// Loads the public keys of an SPKI (`BEGIN PUBLIC KEY`) or PKCS#1 (`BEGIN RSA PUBLIC KEY`)
    /// PEM file. A file may hold several keys (old and new during a rotation); a signature by
    /// any of them verifies.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Verifier::from_pem(path, &read(path)?)
    }

    /// Parses `text`, the content of the PEM file at `path` (named in errors).
    pub fn from_pem(path: &Path, text: &[u8]) -> Result<Self, KeyError> {
        let blocks = pem::parse_many(text).map_err(|e| not_pem(path, text, e, true))?;
        if blocks.is_empty() {
            return Err(not_pem(path, text, "no PEM block found", true));
        }
        let mut keys = Vec::with_capacity(blocks.len());
        let mut fingerprints = Vec::with_capacity(blocks.len());
        for block in blocks {
            if !matches!(block.tag(), "PUBLIC KEY" | "RSA PUBLIC KEY") {
                return Err(KeyError::WrongKind {
                    path: path.to_owned(),
                    tag: block.tag().to_owned(),
                    expected: "`PUBLIC KEY` or `RSA PUBLIC KEY`",
                });
            }
            // aws-lc accepts both the PKCS#1 and the SPKI encoding of an RSA key here, and
            // refuses any other key type (EC, Ed25519) for an RSA algorithm.
            let key =
                ParsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, block.contents())
                    .map_err(|e| not_rsa(path, block.contents(), e))?;
            keys.push(key);
            // Either encoding is fingerprinted as SPKI, as audit checkpoints carry keys.
            let spki = aws_lc_rs::rsa::PublicKey::from_der(block.contents())
                .ok()
                .and_then(|k| k.as_der().ok())
                .map_or_else(|| block.contents().to_vec(), |d| d.as_ref().to_vec());
            fingerprints.push(fingerprint(&spki));
        }
        Ok(Verifier { keys, fingerprints })
    }

    /// An RSA public key from its DER (SPKI or PKCS#1), as an audit checkpoint carries it.
    pub(crate) fn from_der(der: &[u8]) -> Option<Self> {
        ParsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, der)
            .ok()
            .map(|k| Verifier {
                keys: vec![k],
                fingerprints: vec![fingerprint(der)],
            })
    }

    /// Each key's [`fingerprint`], in file order.
    pub fn fingerprints(&self) -> &[String] {
        &self.fingerprints
    }

    /// True when `sig` is a valid RS256 signature of `message` by one of these keys.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        self.keys.iter().any(|k| k.verify_sig(message, sig).is_ok())
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Verifier(RSA)")
    }
}

/// The bytes of a key file.
pub fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Where `keygen` wrote a key pair.
#[derive(Debug)]
pub struct KeyFiles {
    pub private: PathBuf,
    pub public: PathBuf,
}

/// Generates an RSA-2048 key pair and writes `DIR/NAME-pri.pem` (PKCS#8, mode 0600) and
/// `DIR/NAME-pub.key` (SPKI). Existing files are not overwritten.
pub fn generate(dir: &Path, name: &str) -> Result<KeyFiles, KeyError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    if name.is_empty() || name.len() > 64 || !name.bytes().all(allowed) {
        return Err(KeyError::Name(name.to_owned()));
    }
    let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
    let private_der = pair.as_der().map_err(|_| KeyError::Generate)?;
    let public_der = pair.public_key().as_der().map_err(|_| KeyError::Generate)?;
    let private_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", private_der.as_ref().to_vec()));
    let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", public_der.as_ref().to_vec()));

    fs::create_dir_all(dir).map_err(|source| KeyError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let files = KeyFiles {
        private: dir.join(format!("{name}-pri.pem")),
        public: dir.join(format!("{name}-pub.key")),
    };
    for path in [&files.private, &files.public] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    write_new(&files.private, private_pem.as_bytes(), 0o600)?;
    write_new(&files.public, public_pem.as_bytes(), 0o644)?;
    Ok(files)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    // create_new: never clobber a key someone may still depend on; mode set at creation so the
    // private key is never readable by others, not even briefly.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pair_signs_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path(), "t").unwrap();
        let signer = Signer::load(&files.private).unwrap();
        let verifier = Verifier::load(&files.public).unwrap();
        let sig = signer.sign(b"hello");
        assert!(verifier.verify(b"hello", &sig));
        assert!(!verifier.verify(b"hellp", &sig));
        let mode = fs::metadata(&files.private).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(fs::read_to_string(&files.private)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(fs::read_to_string(&files.public)
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----"));
        // A second keygen into the same place must not overwrite the first pair.
        assert!(matches!(
            generate(dir.path(), "t"),
            Err(KeyError::Exists { .. })
        ));
    }

    #[test]
    fn wrong_pem_kind_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path(), "t").unwrap();
        let err = Verifier::load(&files.private).unwrap_err().to_string();
        assert!(
            err.contains("t-pri.pem") && err.contains("PRIVATE KEY"),
            "{err}"
        );
        let err = Signer::load(&files.public).unwrap_err().to_string();
        assert!(err.contains("t-pub.key"), "{err}");
        let missing = dir.path().join("nope.pem");
        let err = Signer::load(&missing).unwrap_err().to_string();
        assert!(
            err.contains("nope.pem") && err.contains("cannot read"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;

    #[test]
    fn a_public_key_file_may_hold_old_and_new_keys() {
        let dir = tempfile::tempdir().unwrap();
        let old = generate(dir.path(), "old").unwrap();
        let new = generate(dir.path(), "new").unwrap();
        let mut both = fs::read(&old.public).unwrap();
        both.extend(fs::read(&new.public).unwrap());
        let path = dir.path().join("both.key");
        fs::write(&path, both).unwrap();
        let verifier = Verifier::load(&path).unwrap();
        for f in [&old, &new] {
            let signer = Signer::load(&f.private).unwrap();
            assert!(verifier.verify(b"m", &signer.sign(b"m")));
        }
        let other = generate(dir.path(), "other").unwrap();
        assert!(!verifier.verify(b"m", &Signer::load(&other.private).unwrap().sign(b"m")));
    }
}
