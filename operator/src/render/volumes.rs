//! Volumes every engine pod mounts: the model (read-only), shared memory, etcd TLS.

use k8s_openapi::api::core::v1::{
    EmptyDirVolumeSource, HostPathVolumeSource, ImageVolumeSource, PersistentVolumeClaimVolumeSource,
    SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::{InferenceDeploymentSpec, ModelSource, RoleSpec};

use super::{ETCD_TLS_MOUNT, MODEL_MOUNT};

const MODEL_VOLUME: &str = "model";
const SHM_VOLUME: &str = "dshm";
const ETCD_TLS_VOLUME: &str = "etcd-tls";

/// Volumes and their mounts for `role`'s container.
pub fn volumes(spec: &InferenceDeploymentSpec, role: &RoleSpec, etcd_tls_secret: Option<&str>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    if role.kind.runs_engine() {
        volumes.push(model_volume(&spec.model.source));
        mounts.push(mount(MODEL_VOLUME, MODEL_MOUNT, true));
        // NCCL and CUDA IPC use /dev/shm; the container runtime's default 64 MiB is too small.
        volumes.push(Volume {
            name: SHM_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource { medium: Some("Memory".into()), size_limit: Some(Quantity("16Gi".into())) }),
            ..Default::default()
        });
        mounts.push(mount(SHM_VOLUME, "/dev/shm", false));
    }
    if let Some(secret) = etcd_tls_secret {
        volumes.push(Volume {
            name: ETCD_TLS_VOLUME.into(),
            secret: Some(SecretVolumeSource { secret_name: Some(secret.to_string()), ..Default::default() }),
            ..Default::default()
        });
        mounts.push(mount(ETCD_TLS_VOLUME, ETCD_TLS_MOUNT, true));
    }
    (volumes, mounts)
}

fn model_volume(source: &ModelSource) -> Volume {
    let mut volume = Volume { name: MODEL_VOLUME.into(), ..Default::default() };
    if let Some(pvc) = &source.pvc {
        volume.persistent_volume_claim =
            Some(PersistentVolumeClaimVolumeSource { claim_name: pvc.claim_name.clone(), read_only: Some(true) });
    } else if let Some(host) = &source.host_path {
        volume.host_path = Some(HostPathVolumeSource { path: host.path.clone(), type_: Some("Directory".into()) });
    } else if let Some(image) = &source.image {
        volume.image =
            Some(ImageVolumeSource { reference: Some(image.reference.clone()), pull_policy: image.pull_policy.clone() });
    }
    volume
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(read_only), ..Default::default() }
}
