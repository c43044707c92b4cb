use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// How one engine instance spreads over GPUs and nodes.
///
/// GPUs per instance = tensor x dataParallel; nodes per instance = that / gpusPerNode.
/// Expert parallelism reuses the same GPUs, so it is either off (1) or spans all of them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.expert == 1 || self.expert == self.tensor * self.dataParallel").message("parallelism.expert must be 1 or tensor x dataParallel (experts are sharded over the instance's GPUs)"))]
#[x_kube(validation = Rule::new("!has(self.gpusPerNode) || self.tensor * self.dataParallel <= self.gpusPerNode || (self.tensor * self.dataParallel) % self.gpusPerNode == 0").message("tensor x dataParallel must fit on one node or be a multiple of gpusPerNode"))]
pub struct Parallelism {
    /// Tensor-parallel degree (the engine's --tensor-parallel-size).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub tensor: i32,
    /// Attention data-parallel degree.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub data_parallel: i32,
    /// Expert-parallel degree (MoE models).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 512))]
    pub expert: i32,
    /// GPUs of one node an instance may use (default: all of the instance's GPUs, up to 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub gpus_per_node: Option<i32>,
}

fn one() -> i32 {
    1
}

impl Default for Parallelism {
    fn default() -> Self {
        Parallelism { tensor: 1, data_parallel: 1, expert: 1, gpus_per_node: None }
    }
}
