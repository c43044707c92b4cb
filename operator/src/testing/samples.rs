//! The manifests under examples/, parsed, with the metadata an apiserver would add.

use crate::crd::InferenceDeployment;

pub const AGGREGATED: &str = include_str!("../../../examples/aggregated-single-gpu.yaml");
pub const DISAGGREGATED: &str = include_str!("../../../examples/disaggregated-rdma.yaml");
pub const AUTOSCALED: &str = include_str!("../../../examples/autoscaled.yaml");
pub const MULTINODE: &str = include_str!("../../../examples/multinode-tensor-parallel.yaml");

pub fn parse(yaml: &str) -> InferenceDeployment {
    let mut dep: InferenceDeployment = serde_norway::from_str(yaml).expect("example parses as InferenceDeployment");
    dep.metadata.namespace = Some("default".into());
    dep.metadata.uid = Some(format!("uid-{}", dep.metadata.name.clone().unwrap_or_default()));
    dep.metadata.generation = Some(1);
    dep
}

pub fn aggregated() -> InferenceDeployment {
    parse(AGGREGATED)
}

pub fn disaggregated() -> InferenceDeployment {
    parse(DISAGGREGATED)
}

pub fn autoscaled() -> InferenceDeployment {
    parse(AUTOSCALED)
}

pub fn multinode() -> InferenceDeployment {
    parse(MULTINODE)
}

pub fn all() -> Vec<InferenceDeployment> {
    vec![aggregated(), disaggregated(), autoscaled(), multinode()]
}
