//! `dlengine-operator render`: the objects the controller would create for a manifest, as
//! files, so that they can be read, diffed and schema-validated without a cluster.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crd::InferenceDeployment;
use crate::render::{self, RenderContext, RenderError};
use crate::validate::spec_problems;

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{deployment}: {message}")]
    Invalid { deployment: String, message: String },
    #[error("{deployment}: {source}")]
    Render { deployment: String, source: RenderError },
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("serialising {what}: {message}")]
    Serialise { what: String, message: String },
}

/// Every InferenceDeployment document of a YAML stream (other kinds are skipped).
pub fn parse_deployments(yaml: &str, origin: &str) -> Result<Vec<InferenceDeployment>, OfflineError> {
    let mut deployments = Vec::new();
    for document in serde_norway::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(document).map_err(|e| OfflineError::Parse { path: origin.into(), message: e.to_string() })?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("InferenceDeployment") {
            continue;
        }
        let dep = serde_json::from_value(value).map_err(|e| OfflineError::Parse { path: origin.into(), message: e.to_string() })?;
        deployments.push(dep);
    }
    Ok(deployments)
}

/// Fills what an apiserver would (namespace, uid), so owner references render.
pub fn as_if_stored(mut dep: InferenceDeployment, namespace: &str) -> InferenceDeployment {
    dep.metadata.namespace.get_or_insert_with(|| namespace.to_string());
    dep.metadata.uid.get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".to_string());
    dep.metadata.generation.get_or_insert(1);
    dep
}

/// Renders `dep` at its spec's replicas; returns (file name, YAML) per object.
pub fn render_files(dep: &InferenceDeployment, ctx: &RenderContext) -> Result<Vec<(String, String)>, OfflineError> {
    let name = dep.metadata.name.clone().unwrap_or_default();
    let problems = spec_problems(&dep.spec);
    if !problems.is_empty() {
        let message = problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ");
        return Err(OfflineError::Invalid { deployment: name, message });
    }
    let desired = render::render(dep, ctx, &|role| role.replicas).map_err(|source| OfflineError::Render { deployment: name.clone(), source })?;
    desired
        .objects
        .iter()
        .map(|object| {
            let manifest = object.manifest().map_err(|e| OfflineError::Serialise { what: object.name(), message: e.to_string() })?;
            let yaml = serde_norway::to_string(&manifest).map_err(|e| OfflineError::Serialise { what: object.name(), message: e.to_string() })?;
            Ok((format!("{name}/{}-{}.yaml", object.kind().to_lowercase(), object.name()), yaml))
        })
        .collect()
}

/// Renders every deployment of every input into `output_dir`; returns the files written.
pub fn render_to_dir(inputs: &[PathBuf], output_dir: &Path, namespace: &str, ctx: &RenderContext) -> Result<Vec<PathBuf>, OfflineError> {
    let mut written = Vec::new();
    for input in inputs {
        let origin = input.display().to_string();
        let text = std::fs::read_to_string(input).map_err(|e| OfflineError::Parse { path: origin.clone(), message: e.to_string() })?;
        for dep in parse_deployments(&text, &origin)? {
            for (file, yaml) in render_files(&as_if_stored(dep, namespace), ctx)? {
                let path = output_dir.join(file);
                write(&path, &yaml)?;
                written.push(path);
            }
        }
    }
    Ok(written)
}

fn write(path: &Path, text: &str) -> Result<(), OfflineError> {
    let error = |source| OfflineError::Write { path: path.display().to_string(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    std::fs::write(path, text).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::samples;

    #[test]
    fn every_example_renders_to_files() {
        let dir = tempfile::tempdir().unwrap();
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let inputs: Vec<PathBuf> = std::fs::read_dir(&examples).unwrap().map(|e| e.unwrap().path()).collect();
        let ctx = RenderContext { default_etcd_endpoints: vec!["http://etcd:2379".into()], ..Default::default() };
        let written = render_to_dir(&inputs, dir.path(), "default", &ctx).unwrap();
        assert!(written.len() >= 4 * 4, "{written:?}");
        assert!(written.iter().all(|p| p.exists()));
    }

    #[test]
    fn invalid_manifests_name_the_problem() {
        let mut dep = samples::aggregated();
        dep.spec.roles.clear();
        let err = render_files(&dep, &RenderContext::default()).unwrap_err();
        assert!(err.to_string().contains("no role serves the model"), "{err}");
    }
}
