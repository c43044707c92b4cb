//! The `dlengine-operator` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "dlengine-operator", version, about = "Kubernetes operator for dlengine InferenceDeployments")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (leader election, metrics, graceful shutdown on SIGTERM).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Render the objects the operator would create for InferenceDeployment manifests, offline.
    Render(RenderArgs),
    /// Write the etcd config of a bundled etcd member (init container of the chart's etcd).
    EtcdConfig(EtcdConfigArgs),
}

#[derive(Debug, Args)]
pub struct EtcdConfigArgs {
    /// This member's pod name, `<statefulset>-<ordinal>`.
    #[arg(long, env = "POD_NAME")]
    pub name: String,
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    #[arg(long)]
    pub statefulset: String,
    #[arg(long)]
    pub headless_service: String,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub replicas: u32,
    #[arg(long, default_value = "/var/lib/etcd")]
    pub data_dir: PathBuf,
    /// Directory with ca.crt, tls.crt and tls.key (TLS for clients and peers).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DLENGINE_OPERATOR_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// etcd endpoints for deployments that name none (the chart's bundled etcd).
    #[arg(long, env = "DLENGINE_OPERATOR_DEFAULT_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub default_etcd_endpoints: Vec<String>,
    /// Secret name (in each deployment's namespace) with ca.crt/tls.crt/tls.key for the default etcd.
    #[arg(long, env = "DLENGINE_OPERATOR_DEFAULT_ETCD_TLS_SECRET")]
    pub default_etcd_tls_secret: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Elect a leader among replicas through a Lease (turn off only for a single replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    #[arg(long, default_value = "dlengine-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's name in the Lease (default: POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_duration_secs: u64,
    /// Reconciliations at once (0: unbounded).
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// YAML files with InferenceDeployment documents.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Directory to write one YAML file per rendered object into.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Used when a manifest names no etcd endpoints.
    #[arg(long, value_delimiter = ',', default_value = "http://dlengine-etcd.dlengine-system.svc:2379")]
    pub default_etcd_endpoints: Vec<String>,
    /// Namespace for manifests that name none.
    #[arg(long, default_value = "default")]
    pub namespace: String,
}

/// Parses `args`; on a bad command line returns the one-line reason (exit code 2).
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args)
}

/// clap's first line (`error: ...`), which names the bad flag or value.
pub fn one_line(error: &clap::Error) -> String {
    error.to_string().lines().next().unwrap_or("error: bad command line").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    #[test]
    fn run_defaults_elect_a_leader() {
        let Command::Run(args) = parse(["dlengine-operator", "run"]).unwrap().command else { panic!("not run") };
        assert!(args.leader_elect);
        assert_eq!(args.metrics_addr.port(), 8080);
    }

    #[test]
    fn bad_flags_are_one_line_errors() {
        let error = parse(["dlengine-operator", "run", "--lease-duration-secs", "1"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ValueValidation);
        assert!(!one_line(&error).contains('\n'));
        assert!(one_line(&error).contains("lease-duration-secs"), "{}", one_line(&error));
        assert!(parse(["dlengine-operator", "run", "--metrics-addr", "nowhere"]).is_err());
        assert!(parse(["dlengine-operator", "render"]).is_err(), "render needs inputs");
    }
}
