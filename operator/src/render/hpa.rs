//! The scale handle of a role (`InferenceRoleScaler`) and, for actuator HPA, the
//! HorizontalPodAutoscaler that drives it.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior,
    HorizontalPodAutoscalerSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

use crate::crd::{AutoscalingSpec, InferenceRoleScaler, InferenceRoleScalerSpec};

pub fn role_scaler(metadata: ObjectMeta, deployment: &str, role: &str, replicas: i32) -> InferenceRoleScaler {
    let mut scaler = InferenceRoleScaler::new(
        metadata.name.as_deref().unwrap_or_default(),
        InferenceRoleScalerSpec { deployment: deployment.into(), role: role.into(), replicas },
    );
    scaler.metadata = metadata;
    scaler
}

pub fn autoscaler(metadata: ObjectMeta, autoscaling: &AutoscalingSpec) -> HorizontalPodAutoscaler {
    let target = metadata.name.clone().unwrap_or_default();
    HorizontalPodAutoscaler {
        metadata,
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(InferenceRoleScaler::api_version(&()).into_owned()),
                kind: InferenceRoleScaler::kind(&()).into_owned(),
                name: target,
            },
            min_replicas: Some(autoscaling.min_replicas.max(1)),
            max_replicas: autoscaling.max_replicas,
            metrics: autoscaling.hpa.as_ref().map(|h| h.metrics.clone()),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_up: Some(window(autoscaling.behavior.scale_up_stabilization_seconds)),
                scale_down: Some(window(autoscaling.behavior.scale_down_stabilization_seconds)),
            }),
        }),
        status: None,
    }
}

fn window(seconds: i32) -> HPAScalingRules {
    HPAScalingRules { stabilization_window_seconds: Some(seconds), ..Default::default() }
}
