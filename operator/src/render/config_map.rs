//! A ConfigMap per workload with the rendered command line, so that `kubectl get cm`
//! shows exactly what each revision runs (and what changed between two revisions).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub const COMMAND_KEY: &str = "command.json";
pub const SHAPE_KEY: &str = "instance.json";

pub fn engine_config(metadata: ObjectMeta, command: &[String], shape_json: String) -> Result<ConfigMap, serde_json::Error> {
    Ok(ConfigMap {
        metadata,
        data: Some(BTreeMap::from([
            (COMMAND_KEY.to_string(), serde_json::to_string_pretty(command)?),
            (SHAPE_KEY.to_string(), shape_json),
        ])),
        ..Default::default()
    })
}
