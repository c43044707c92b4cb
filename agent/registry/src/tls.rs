//! TLS to etcd: the CA that signed etcd's certificate and, for an etcd that checks its
//! clients, this client's certificate and key. Read once at start-up, so a missing or
//! unreadable file fails the process with the file named instead of a retry loop.

use std::path::Path;

use dlengine_cli::EtcdTlsArgs;
use etcd_client::{Certificate, Identity, TlsOptions};

use crate::error::RegistryError;

#[derive(Debug, Clone)]
pub struct EtcdTls {
    ca: Vec<u8>,
    /// (certificate, key), PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// The TLS settings `args` ask for, checked against the endpoints' schemes: TLS needs
    /// https:// endpoints and the CA file (etcd's CA is private). `None`: plain HTTP.
    pub fn from_args(args: &EtcdTlsArgs, endpoints: &[String]) -> Result<Option<EtcdTls>, RegistryError> {
        let wanted = args.etcd_ca_file.is_some() || args.etcd_cert_file.is_some() || args.etcd_key_file.is_some();
        let https = endpoints.iter().filter(|e| e.starts_with("https://")).count();
        if !wanted {
            return match https {
                0 => Ok(None),
                _ => Err(RegistryError::Tls("https:// etcd endpoints need --etcd-ca-file (DLENGINE_ETCD_CA_FILE)".into())),
            };
        }
        if https != endpoints.len() {
            return Err(RegistryError::Tls(format!("etcd TLS files are given, so every endpoint must be https://: {endpoints:?}")));
        }
        let Some(ca) = &args.etcd_ca_file else {
            return Err(RegistryError::Tls("a client certificate for etcd needs --etcd-ca-file (DLENGINE_ETCD_CA_FILE) too".into()));
        };
        let ca = read(ca)?;
        let identity = match (&args.etcd_cert_file, &args.etcd_key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => return Err(RegistryError::Tls("--etcd-cert-file and --etcd-key-file go together".into())),
        };
        Ok(Some(EtcdTls { ca, identity }))
    }

    pub(crate) fn options(&self) -> TlsOptions {
        let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some((cert, key)) = &self.identity {
            options = options.identity(Identity::from_pem(cert, key));
        }
        options
    }
}

fn read(path: &Path) -> Result<Vec<u8>, RegistryError> {
    let bytes = std::fs::read(path).map_err(|source| RegistryError::TlsFile { path: path.to_path_buf(), source })?;
    if !bytes.starts_with(b"-----BEGIN") {
        return Err(RegistryError::Tls(format!("{} is not a PEM file", path.display())));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn args(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> EtcdTlsArgs {
        EtcdTlsArgs { etcd_ca_file: ca.map(PathBuf::from), etcd_cert_file: cert.map(PathBuf::from), etcd_key_file: key.map(PathBuf::from) }
    }

    #[test]
    fn plain_endpoints_need_no_tls_and_https_ones_need_a_ca() {
        assert!(EtcdTls::from_args(&args(None, None, None), &["http://etcd:2379".into()]).unwrap().is_none());
        let err = EtcdTls::from_args(&args(None, None, None), &["https://etcd:2379".into()]).unwrap_err();
        assert!(err.to_string().contains("--etcd-ca-file"), "{err}");
    }

    #[test]
    fn tls_files_need_https_endpoints_and_readable_pem() {
        let dir = std::env::temp_dir().join(format!("dlengine-tls-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let err = EtcdTls::from_args(&args(Some(&ca), None, None), &["http://etcd:2379".into()]).unwrap_err();
        assert!(err.to_string().contains("must be https://"), "{err}");
        let missing = dir.join("missing.crt");
        let err = EtcdTls::from_args(&args(Some(&missing), None, None), &["https://etcd:2379".into()]).unwrap_err();
        assert!(err.to_string().contains("missing.crt"), "{err}");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = EtcdTls::from_args(&args(Some(&not_pem), None, None), &["https://etcd:2379".into()]).unwrap_err();
        assert!(err.to_string().contains("not a PEM file"), "{err}");
        assert!(EtcdTls::from_args(&args(Some(&ca), None, None), &["https://etcd:2379".into()]).unwrap().is_some());
        let err = EtcdTls::from_args(&args(None, Some(&ca), Some(&ca)), &["https://etcd:2379".into()]).unwrap_err();
        assert!(err.to_string().contains("needs --etcd-ca-file"), "{err}");
        let err = EtcdTls::from_args(&args(Some(&ca), None, Some(&ca)), &["https://etcd:2379".into()]).unwrap_err();
        assert!(err.to_string().contains("go together"), "a key without its certificate: {err}");
        let err = EtcdTls::from_args(&args(None, None, Some(&ca)), &["http://etcd:2379".into()]).unwrap_err();
        assert!(err.to_string().contains("must be https://"), "a lone key file is not ignored: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
