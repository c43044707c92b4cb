//! The etcd v3 implementation: connect, delete the prefix, drop the connection. A deletion
//! happens once per deleted deployment, so no connection is kept open.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, DeleteOptions, Identity, TlsOptions};

use super::{DeleteFuture, RegistryCleaner, RegistryError, RegistryTarget};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// PEM material from the deployment's `registry.tlsSecret`.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub client_cert: Option<Vec<u8>>,
    pub client_key: Option<Vec<u8>>,
}

#[derive(Debug, Default, Clone)]
pub struct EtcdRegistry;

impl EtcdRegistry {
    async fn delete(&self, target: &RegistryTarget) -> Result<u64, RegistryError> {
        let prefix = target.prefix();
        let connect_error = |e: etcd_client::Error| RegistryError::Connect { endpoints: target.endpoints.clone(), message: e.to_string() };
        let mut client = Client::connect(&target.endpoints, Some(options(target.tls.as_ref()))).await.map_err(connect_error)?;
        let response = client
            .delete(prefix.as_bytes(), Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(|e| RegistryError::Delete { prefix: prefix.clone(), message: e.to_string() })?;
        Ok(u64::try_from(response.deleted()).unwrap_or(0))
    }
}

pub(crate) fn options(tls: Option<&EtcdTls>) -> ConnectOptions {
    let options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
    let Some(tls) = tls else { return options };
    let mut tls_options = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        tls_options = tls_options.identity(Identity::from_pem(cert, key));
    }
    options.with_tls(tls_options)
}

impl RegistryCleaner for EtcdRegistry {
    fn delete_deployment<'a>(&'a self, target: &'a RegistryTarget) -> DeleteFuture<'a> {
        Box::pin(self.delete(target))
    }
}

#[cfg(test)]
mod tests {
    //! Against a real etcd (Debian's `etcd-server`), started on a free port; skipped with a
    //! printed reason when the binary is not installed.

    use super::*;
    use std::process::{Child, Command, Stdio};

    struct EtcdProcess {
        child: Child,
        _dir: tempfile::TempDir,
        endpoint: String,
    }

    impl Drop for EtcdProcess {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn start_etcd() -> Option<EtcdProcess> {
        let binary = ["/usr/bin/etcd", "/usr/local/bin/etcd"].into_iter().find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let child = Command::new(binary)
            .args(["--data-dir", dir.path().to_str().unwrap(), "--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}"), "--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(EtcdProcess { child, _dir: dir, endpoint })
    }

    async fn connect_with_retry(endpoint: &str) -> Client {
        for _ in 0..100 {
            if let Ok(mut c) = Client::connect([endpoint], None).await {
                if c.status().await.is_ok() {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd at {endpoint} did not come up");
    }

    #[tokio::test]
    async fn deletes_exactly_the_deployment_prefix_in_real_etcd() {
        let Some(etcd) = start_etcd() else {
            eprintln!("SKIPPED: no etcd binary (install Debian's etcd-server to run this test)");
            return;
        };
        let mut client = connect_with_retry(&etcd.endpoint).await;
        for key in ["/dlengine/ns/llama/0/prefill/a", "/dlengine/ns/llama/1/decode/b", "/dlengine/ns/llama2/0/decode/c", "/dlengine/other/llama/0/decode/d"] {
            client.put(key, "{}", None).await.unwrap();
        }
        let target = RegistryTarget { endpoints: vec![etcd.endpoint.clone()], tls: None, namespace: "ns".into(), deployment: "llama".into() };
        assert_eq!(EtcdRegistry.delete_deployment(&target).await.unwrap(), 2);
        let left = client.get("/dlengine/", Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
        let mut keys: Vec<String> = left.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
        keys.sort();
        assert_eq!(keys, vec!["/dlengine/ns/llama2/0/decode/c", "/dlengine/other/llama/0/decode/d"]);
    }

    #[tokio::test]
    async fn unreachable_etcd_is_an_error_not_a_hang() {
        let target = RegistryTarget { endpoints: vec![format!("http://127.0.0.1:{}", free_port())], tls: None, namespace: "ns".into(), deployment: "x".into() };
        let result = tokio::time::timeout(Duration::from_secs(30), EtcdRegistry.delete_deployment(&target)).await;
        assert!(matches!(result, Ok(Err(_))), "{result:?}");
    }
}
