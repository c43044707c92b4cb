use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The served model and where its Hugging Face directory comes from.
///
/// Engines never download weights: the directory must already exist in one of the sources.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Name clients put in the request's `model` field.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    pub source: ModelSource,
    /// Directory of the model inside the source (relative; default: the source's root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("model.path must be relative and must not contain '..'"))]
    pub path: Option<String>,
}

/// Exactly one of `pvc`, `hostPath`, `image`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.pvc), has(self.hostPath), has(self.image)].filter(x, x).size() == 1").message("model.source needs exactly one of pvc, hostPath, image"))]
pub struct ModelSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
}

/// A PersistentVolumeClaim in the deployment's namespace, mounted read-only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    #[schemars(length(min = 1))]
    pub claim_name: String,
}

/// A directory on every node that may run the roles (pre-staged weights).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("hostPath.path must be absolute"))]
    pub path: String,
}

/// An OCI image whose filesystem holds the model (Kubernetes image volume).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    #[schemars(length(min = 1))]
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub pull_policy: Option<String>,
}
