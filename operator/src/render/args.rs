//! The `dlengine` command lines of the roles. A test parses every one of them with the
//! agent's own parser (`dlengine_cli::Cli`), so the two cannot drift apart.

use dlengine_cli::{KvTransport as CliTransport, Mode};

use crate::crd::{InferenceDeploymentSpec, KvTransport, RoleKind, RoleSpec};

use super::{InstanceShape, ENGINE_PORT, MODEL_MOUNT};

/// `dlengine` plus its arguments for `role`.
pub fn command_line(spec: &InferenceDeploymentSpec, role: &RoleSpec, shape: &InstanceShape, etcd: &[String]) -> Vec<String> {
    let mut args = vec!["dlengine".to_string()];
    match engine_mode(role.kind) {
        None => args.extend(router_args(etcd)),
        Some(mode) => args.extend(serve_args(spec, mode, shape, etcd)),
    }
    args.extend(role.engine_args.iter().cloned());
    args
}

fn engine_mode(kind: RoleKind) -> Option<Mode> {
    match kind {
        RoleKind::Router => None,
        RoleKind::Prefill => Some(Mode::Prefill),
        RoleKind::Decode => Some(Mode::Decode),
        RoleKind::Encode => Some(Mode::Encode),
        RoleKind::Aggregated => Some(Mode::Aggregated),
    }
}

fn router_args(etcd: &[String]) -> Vec<String> {
    vec!["router".into(), "--port".into(), ENGINE_PORT.to_string(), "--etcd-endpoints".into(), etcd.join(",")]
}

fn serve_args(spec: &InferenceDeploymentSpec, mode: Mode, shape: &InstanceShape, etcd: &[String]) -> Vec<String> {
    let mut args = vec![
        "serve".to_string(),
        model_dir(spec),
        "--mode".into(),
        mode.as_str().into(),
        "--port".into(),
        ENGINE_PORT.to_string(),
        "--served-model-name".into(),
        spec.model.name.clone(),
        "--etcd-endpoints".into(),
        etcd.join(","),
        "--tensor-parallel-size".into(),
        shape.tensor_parallel.to_string(),
    ];
    if matches!(mode, Mode::Prefill | Mode::Decode) {
        args.push("--kv-transport".into());
        args.push(transport_flag(spec.network.kv_transport).into());
        if spec.network.require_rdma {
            args.push("--require-rdma".into());
        }
    }
    args
}

/// Where the model directory is inside the container.
pub fn model_dir(spec: &InferenceDeploymentSpec) -> String {
    match spec.model.path.as_deref().map(|p| p.trim_matches('/')) {
        Some(path) if !path.is_empty() => format!("{MODEL_MOUNT}/{path}"),
        _ => MODEL_MOUNT.to_string(),
    }
}

/// The CLI spelling of a transport; going through the CLI's own enum makes a rename there
/// a compile error here.
fn transport_flag(transport: KvTransport) -> &'static str {
    let cli = match transport {
        KvTransport::Auto => CliTransport::Auto,
        KvTransport::Rdma => CliTransport::Rdma,
        KvTransport::CudaIpc => CliTransport::CudaIpc,
        KvTransport::Tcp => CliTransport::Tcp,
    };
    match cli {
        CliTransport::Auto => "auto",
        CliTransport::Rdma => "rdma",
        CliTransport::CudaIpc => "cuda-ipc",
        CliTransport::Tcp => "tcp",
    }
}
