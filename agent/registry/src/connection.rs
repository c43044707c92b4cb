//! Connecting to etcd and bounding every call in time.
//!
//! The client's channel reconnects lazily, so a call to an etcd that is down can wait a long
//! time; every unary call here carries its own deadline, and HTTP/2 keep-alives make a
//! silently partitioned stream (watch, lease keep-alive) fail instead of hanging.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::error::RegistryError;
use crate::tls::EtcdTls;

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    /// Deadline of one unary call (get, put, grant, revoke).
    pub request_timeout: Duration,
    /// HTTP/2 ping interval (a ping unanswered for as long again breaks the connection).
    /// etcd answers pings more frequent than every 5 s with GOAWAY `too_many_pings`.
    pub keep_alive: Duration,
    pub tls: Option<EtcdTls>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_secs(6),
            tls: None,
        }
    }

    pub fn with_tls(self, tls: Option<EtcdTls>) -> Self {
        EtcdConfig { tls, ..self }
    }

    pub async fn connect(&self) -> Result<Client, RegistryError> {
        if self.endpoints.is_empty() {
            return Err(RegistryError::NoEndpoints);
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.keep_alive, self.keep_alive)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.options());
        }
        let connect = Client::connect(&self.endpoints, Some(options));
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(source)) => Err(RegistryError::Connect { endpoints: self.endpoints.clone(), source }),
            Err(_) => Err(RegistryError::Connect {
                endpoints: self.endpoints.clone(),
                source: etcd_client::Error::InvalidArgs("connect timed out".into()),
            }),
        }
    }

    /// Runs one etcd call under the request deadline, naming the operation in errors.
    pub async fn call<T>(
        &self,
        operation: &'static str,
        key: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(RegistryError::Etcd { operation, key: key.to_string(), source }),
            Err(_) => Err(RegistryError::Timeout { operation, key: key.to_string(), after: self.request_timeout }),
        }
    }
}
