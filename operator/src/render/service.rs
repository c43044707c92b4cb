//! The ClusterIP Service behind the OpenAI endpoint: the router's pods, or the aggregated
//! engines' when the deployment has no router.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{InferenceDeploymentSpec, RoleKind, RoleSpec};

use super::{labels, ENGINE_PORT};

/// The role clients talk to.
pub fn front_role(spec: &InferenceDeploymentSpec) -> Option<&RoleSpec> {
    spec.roles
        .iter()
        .find(|r| r.kind == RoleKind::Router)
        .or_else(|| spec.roles.iter().find(|r| r.kind == RoleKind::Aggregated))
}

pub fn endpoint_service(metadata: ObjectMeta, deployment: &str, front: &RoleSpec) -> Service {
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(labels::role_selector(deployment, front)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: ENGINE_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}
