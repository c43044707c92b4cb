//! Parallelism -> GPUs and nodes of one instance.

use crate::crd::{Parallelism, RoleKind, RoleSpec};

/// Largest node the operator assumes when `gpusPerNode` is not given.
const DEFAULT_MAX_GPUS_PER_NODE: i32 = 8;

/// How one instance of a role lays out over GPUs and pods (one pod per node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceShape {
    pub gpus_per_instance: i32,
    pub gpus_per_pod: i32,
    pub nodes: i32,
    pub tensor_parallel: i32,
}

impl InstanceShape {
    /// The shape of `role`'s instances, or why its parallelism cannot be served.
    pub fn of(role: &RoleSpec) -> Result<InstanceShape, String> {
        if role.kind == RoleKind::Router {
            if role.parallelism.is_some() {
                return Err("a Router role has no parallelism".into());
            }
            return Ok(InstanceShape { gpus_per_instance: 0, gpus_per_pod: 0, nodes: 1, tensor_parallel: 1 });
        }
        let p = role.parallelism.clone().unwrap_or_default();
        check_engine_support(&p)?;
        shape_from(&p)
    }
}

/// The `dlengine` command line has a tensor-parallel flag only; refusing here keeps the
/// operator from starting engines that would silently ignore the other degrees.
fn check_engine_support(p: &Parallelism) -> Result<(), String> {
    if p.data_parallel != 1 {
        return Err("attention data-parallel > 1 is not supported: `dlengine serve` has no data-parallel flag yet".into());
    }
    if p.expert != 1 {
        return Err("expert-parallel > 1 is not supported: `dlengine serve` has no expert-parallel flag yet".into());
    }
    Ok(())
}

fn shape_from(p: &Parallelism) -> Result<InstanceShape, String> {
    if p.tensor < 1 || p.data_parallel < 1 {
        return Err("tensor and dataParallel must be at least 1".into());
    }
    let gpus = p.tensor * p.data_parallel;
    if p.expert != 1 && p.expert != gpus {
        return Err(format!("expert must be 1 or tensor x dataParallel = {gpus}"));
    }
    let per_node = p.gpus_per_node.unwrap_or(gpus.min(DEFAULT_MAX_GPUS_PER_NODE));
    if per_node < 1 {
        return Err("gpusPerNode must be at least 1".into());
    }
    if gpus <= per_node {
        return Ok(InstanceShape { gpus_per_instance: gpus, gpus_per_pod: gpus, nodes: 1, tensor_parallel: p.tensor });
    }
    if gpus % per_node != 0 {
        return Err(format!("tensor x dataParallel = {gpus} GPUs is not a multiple of gpusPerNode = {per_node}"));
    }
    Ok(InstanceShape { gpus_per_instance: gpus, gpus_per_pod: per_node, nodes: gpus / per_node, tensor_parallel: p.tensor })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(tensor: i32, per_node: Option<i32>) -> Parallelism {
        Parallelism { tensor, gpus_per_node: per_node, ..Default::default() }
    }

    #[test]
    fn one_gpu_is_one_pod() {
        assert_eq!(shape_from(&p(1, None)).unwrap(), InstanceShape { gpus_per_instance: 1, gpus_per_pod: 1, nodes: 1, tensor_parallel: 1 });
    }

    #[test]
    fn tensor_parallel_beyond_a_node_spans_nodes() {
        let shape = shape_from(&p(16, Some(8))).unwrap();
        assert_eq!((shape.nodes, shape.gpus_per_pod), (2, 8));
        let shape = shape_from(&p(16, None)).unwrap();
        assert_eq!((shape.nodes, shape.gpus_per_pod), (2, 8), "default node size is 8 GPUs");
        let shape = shape_from(&p(4, Some(8))).unwrap();
        assert_eq!((shape.nodes, shape.gpus_per_pod), (1, 4));
    }

    #[test]
    fn uneven_split_is_refused() {
        assert!(shape_from(&p(12, Some(8))).unwrap_err().contains("not a multiple"));
    }

    #[test]
    fn data_and_expert_parallel_are_refused_until_the_cli_has_flags() {
        let dp = Parallelism { data_parallel: 2, ..Default::default() };
        assert!(check_engine_support(&dp).is_err());
        let ep = Parallelism { tensor: 2, expert: 2, ..Default::default() };
        assert!(check_engine_support(&ep).is_err());
        assert!(shape_from(&Parallelism { tensor: 2, expert: 3, ..Default::default() }).is_err());
    }
}
