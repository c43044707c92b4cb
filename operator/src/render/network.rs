//! What `spec.network` does to a KV-moving pod: Multus annotation, RDMA device resource,
//! IPC_LOCK, host networking. Nothing here makes a pod privileged.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Capabilities;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::{NetworkSpec, RoleSpec};

use super::InstanceShape;

use super::labels::MULTUS_NETWORKS;

/// The pod-level effect of the network spec on one role.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PodNetwork {
    pub annotations: BTreeMap<String, String>,
    pub extra_resources: BTreeMap<String, Quantity>,
    pub capabilities: Capabilities,
    pub host_network: bool,
    pub host_ipc: bool,
}

/// KV-moving roles and instances whose ranks talk across nodes use the fast network.
pub fn pod_network(network: &NetworkSpec, role: &RoleSpec, shape: &InstanceShape) -> PodNetwork {
    let mut out = PodNetwork { capabilities: Capabilities { drop: Some(vec!["ALL".into()]), add: None }, ..Default::default() };
    if !role.kind.moves_kv() && shape.nodes <= 1 {
        return out;
    }
    if let Some(rdma) = &network.rdma {
        if !rdma.networks.is_empty() {
            out.annotations.insert(MULTUS_NETWORKS.into(), rdma.networks.join(","));
        }
        out.extra_resources.insert(rdma.resource_name.clone(), Quantity(rdma.resource_count.to_string()));
        // Registering RDMA memory pins pages, which needs IPC_LOCK (or an unlimited memlock).
        out.capabilities.add = Some(vec!["IPC_LOCK".into()]);
    }
    if network.host_network {
        out.host_network = true;
        out.capabilities.add = Some(vec!["IPC_LOCK".into()]);
    }
    out.host_ipc = network.host_ipc;
    out
}
