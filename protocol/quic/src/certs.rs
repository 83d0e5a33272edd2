//! The cluster's certificates: one CA per cluster, one certificate and key per name.
//!
//! A directory made by [`init`] holds `ca.pem` and `ca.key`, and `<name>.pem` and `<name>.key`
//! for every name. Keys are written with mode 0600, and never over an existing file. A
//! certificate is valid for one DNS name, [`dns_name`]`(name, cluster)`, so that it names both
//! the process and the cluster; the CA's common name names the cluster too.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why certificates could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: already exists (certificates are never overwritten; use another directory)")]
    Exists { path: PathBuf },
    #[error("{path}: not a PEM {what}: {message}")]
    Pem { path: PathBuf, what: &'static str, message: String },
    #[error("`{0}` is not a valid name: lowercase letters, digits and inner hyphens")]
    BadName(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: the certificate is not for `{expected}` (wrong name or another cluster's directory)")]
    WrongIdentity { path: PathBuf, expected: String },
}

/// The DNS name a certificate of `name` in cluster `cluster` is valid for.
pub fn dns_name(name: &str, cluster: &str) -> String {
    format!("{name}.{cluster}.imago")
}

/// The TLS server name to expect from `name` in `cluster`.
pub fn server_name(name: &str, cluster: &str) -> Result<ServerName<'static>, CertError> {
    ServerName::try_from(dns_name(name, cluster)).map_err(|_| CertError::BadName(name.to_string()))
}

fn ca_params(cluster: &str) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "imago");
    params.distinguished_name.push(DnType::CommonName, format!("imago cluster {cluster} CA"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn leaf_params(name: &str, cluster: &str) -> Result<CertificateParams, CertError> {
    if !protocol::cluster::valid_name(name) || name == protocol::cluster::CA_NAME {
        return Err(CertError::BadName(name.to_string()));
    }
    let mut params = CertificateParams::new(vec![dns_name(name, cluster)])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, format!("imago cluster {cluster}"));
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every process is both: it serves, and it calls others.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Writes `contents` to a new file (never over an existing one), with mode 0600 if `secret`.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists { path: path.to_path_buf() }
        } else {
            io(e)
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// Makes a new cluster CA in `dir` (created if missing) and a certificate for each of `names`.
/// Returns the files written. Refuses a directory that already holds a CA.
pub fn init(dir: &Path, cluster: &str, names: &[String]) -> Result<Vec<PathBuf>, CertError> {
    if !protocol::cluster::valid_name(cluster) {
        return Err(CertError::BadName(cluster.to_string()));
    }
    for name in names {
        leaf_params(name, cluster)?;
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })?;
    let ca_key = KeyPair::generate()?;
    let ca = ca_params(cluster)?.self_signed(&ca_key)?;
    let mut written = Vec::new();
    for (path, contents, secret) in
        [(key_path(dir, "ca"), ca_key.serialize_pem(), true), (cert_path(dir, "ca"), ca.pem(), false)]
    {
        write_new(&path, &contents, secret)?;
        written.push(path);
    }
    written.extend(add(dir, cluster, names)?);
    Ok(written)
}

/// Adds a certificate for each of `names`, signed by the CA in `dir` (a router that joins later
/// gets its certificate this way). Refuses a name that already has one.
pub fn add(dir: &Path, cluster: &str, names: &[String]) -> Result<Vec<PathBuf>, CertError> {
    let ca_key_path = key_path(dir, "ca");
    let text =
        std::fs::read_to_string(&ca_key_path).map_err(|source| CertError::Io { path: ca_key_path.clone(), source })?;
    let ca_key = KeyPair::from_pem(&text).map_err(|e| CertError::Pem {
        path: ca_key_path.clone(),
        what: "private key",
        message: e.to_string(),
    })?;
    // The issuer is the CA's name and key: the same parameters make the same name.
    let issuer = Issuer::new(ca_params(cluster)?, ca_key);
    let mut written = Vec::new();
    for name in names {
        let params = leaf_params(name, cluster)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let key_file = key_path(dir, name);
        write_new(&key_file, &key.serialize_pem(), true)?;
        written.push(key_file);
        let cert_file = cert_path(dir, name);
        write_new(&cert_file, &cert.pem(), false)?;
        written.push(cert_file);
    }
    Ok(written)
}

/// One process's TLS identity and the cluster's CA, loaded from a certificate directory.
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    pub cluster: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            cluster: self.cluster.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

fn load_cert(path: &Path) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::from_pem_file(path).map_err(|e| pem_error(path, "certificate", e))
}

fn pem_error(path: &Path, what: &'static str, e: rustls::pki_types::pem::Error) -> CertError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => CertError::Io { path: path.to_path_buf(), source },
        other => CertError::Pem { path: path.to_path_buf(), what, message: format!("{other:?}") },
    }
}

/// Loads `name`'s certificate and key and the CA from `dir`, and checks that the certificate is
/// `name`'s in `cluster` (a directory of another cluster, or another name's files, are refused).
pub fn load(dir: &Path, cluster: &str, name: &str) -> Result<Identity, CertError> {
    let cert_file = cert_path(dir, name);
    let cert = load_cert(&cert_file)?;
    let key_file = key_path(dir, name);
    let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| pem_error(&key_file, "private key", e))?;
    let ca = load_cert(&cert_path(dir, "ca"))?;
    let expected = dns_name(name, cluster);
    let wrong = || CertError::WrongIdentity { path: cert_file.clone(), expected: expected.clone() };
    let end_entity = webpki::EndEntityCert::try_from(&cert).map_err(|_| wrong())?;
    let server = server_name(name, cluster)?;
    end_entity.verify_is_valid_for_subject_name(&server).map_err(|_| wrong())?;
    Ok(Identity { name: name.to_string(), cluster: cluster.to_string(), chain: vec![cert], key, ca })
}

/// The name a peer's (already verified) certificate is valid for in `cluster`, if any.
pub fn peer_name(cert: &CertificateDer<'_>, cluster: &str) -> Option<String> {
    let end_entity = webpki::EndEntityCert::try_from(cert).ok()?;
    let suffix = format!(".{cluster}.imago");
    let candidates: Vec<String> =
        end_entity.valid_dns_names().filter_map(|n| n.strip_suffix(suffix.as_str()).map(str::to_string)).collect();
    // Listing names is not verifying them: confirm with the verifier's own check.
    candidates.into_iter().find(|name| {
        protocol::cluster::valid_name(name)
            && server_name(name, cluster).is_ok_and(|s| end_entity.verify_is_valid_for_subject_name(&s).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn init_writes_a_ca_and_one_identity_per_name_with_private_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = init(dir.path(), "shop", &names(&["coord-1", "router-1"])).expect("init");
        assert_eq!(written.len(), 6);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for path in written.iter().filter(|p| p.extension().is_some_and(|e| e == "key")) {
                let mode = std::fs::metadata(path).expect("meta").permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
            }
        }
        let id = load(dir.path(), "shop", "router-1").expect("load");
        assert_eq!(peer_name(&id.chain[0], "shop").as_deref(), Some("router-1"));
        assert_eq!(peer_name(&id.chain[0], "other"), None, "another cluster's name");
    }

    #[test]
    fn nothing_is_overwritten_and_wrong_identities_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "shop", &names(&["coord-1"])).expect("init");
        assert!(matches!(init(dir.path(), "shop", &names(&["x"])), Err(CertError::Exists { .. })));
        assert!(matches!(add(dir.path(), "shop", &names(&["coord-1"])), Err(CertError::Exists { .. })));
        add(dir.path(), "shop", &names(&["router-9"])).expect("a later name is signed by the same CA");
        assert!(matches!(load(dir.path(), "other", "coord-1"), Err(CertError::WrongIdentity { .. })));
        // Another name's files under this name: copy router-9's over a new name.
        std::fs::copy(dir.path().join("router-9.pem"), dir.path().join("router-8.pem")).expect("copy");
        std::fs::copy(dir.path().join("router-9.key"), dir.path().join("router-8.key")).expect("copy");
        assert!(matches!(load(dir.path(), "shop", "router-8"), Err(CertError::WrongIdentity { .. })));
        assert!(matches!(init(dir.path(), "Shop", &[]), Err(CertError::BadName(_))));
    }
}
