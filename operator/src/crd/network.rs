use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How prefill and decode move KV cache, and how their pods reach the RDMA fabric.
///
/// Pods never become privileged implicitly: RDMA pods get the IPC_LOCK capability (to pin
/// memory) and the device plugin's resource; host networking and host IPC are opt-ins.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.requireRDMA || self.kvTransport == 'Auto' || self.kvTransport == 'RDMA'").message("requireRDMA needs kvTransport Auto or RDMA"))]
#[x_kube(validation = Rule::new("!(self.requireRDMA || self.kvTransport == 'RDMA') || has(self.rdma) || self.hostNetwork").message("RDMA needs network.rdma (an SR-IOV/RDMA device resource) or hostNetwork: true"))]
#[x_kube(validation = Rule::new("self.kvTransport != 'CudaIPC' || self.hostIPC").message("kvTransport CudaIPC needs hostIPC: true (prefill and decode pods share GPU memory handles on one node)"))]
pub struct NetworkSpec {
    #[serde(default)]
    pub kv_transport: KvTransport,
    /// Engines fail to start instead of falling back to TCP when RDMA is unusable.
    #[serde(default, rename = "requireRDMA")]
    pub require_rdma: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<RdmaAttachment>,
    /// Run KV-transfer roles in the node's network namespace (explicit opt-in).
    #[serde(default)]
    pub host_network: bool,
    /// Share the node's IPC namespace (explicit opt-in; needed by CudaIPC).
    #[serde(default, rename = "hostIPC")]
    pub host_ipc: bool,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvTransport {
    /// The best transport both sides share (RDMA, then CUDA IPC, then TCP).
    #[default]
    Auto,
    #[serde(rename = "RDMA")]
    Rdma,
    #[serde(rename = "CudaIPC")]
    CudaIpc,
    #[serde(rename = "TCP")]
    Tcp,
}

/// RDMA devices from an SR-IOV (or RDMA shared) device plugin and the Multus networks
/// that carry them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RdmaAttachment {
    /// Extended resource of the device plugin, e.g. `nvidia.com/rdma_vf` or `rdma/ib`.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.contains('/')").message("rdma.resourceName must be a qualified extended resource name such as rdma/ib"))]
    pub resource_name: String,
    /// Devices per pod (usually one per GPU of the pod).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 32))]
    pub resource_count: i32,
    /// Multus NetworkAttachmentDefinitions (`name` or `namespace/name`), rendered as the
    /// `k8s.v1.cni.cncf.io/networks` annotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 253)))]
    pub networks: Vec<String>,
}

fn one() -> i32 {
    1
}
