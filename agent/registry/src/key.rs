//! The key layout `/dlengine/<namespace>/<deployment>/<revision>/<role>/<instance-id>`.
//!
//! Prefixes always end in `/` so that deployment `a` never matches deployment `ab`.

use crate::record::{Role, WorkerRecord};

const ROOT: &str = "/dlengine";

/// Where one engine process is registered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryKey {
    pub namespace: String,
    pub deployment: String,
    pub revision: String,
    pub role: Role,
    pub instance_id: String,
}

impl RegistryKey {
    pub fn render(&self) -> String {
        format!(
            "{ROOT}/{}/{}/{}/{}/{}",
            self.namespace,
            self.deployment,
            self.revision,
            self.role.as_str(),
            self.instance_id
        )
    }

    pub fn of_record(record: &WorkerRecord) -> RegistryKey {
        RegistryKey {
            namespace: record.namespace.clone(),
            deployment: record.deployment.clone(),
            revision: record.revision.clone(),
            role: record.role,
            instance_id: record.instance_id.clone(),
        }
    }

    /// Parses a key written by [`RegistryKey::render`]; `None` for anything else.
    pub fn parse(key: &str) -> Option<RegistryKey> {
        let rest = key.strip_prefix(ROOT)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [namespace, deployment, revision, role, instance_id] = parts.as_slice() else { return None };
        if [namespace, deployment, revision, instance_id].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(RegistryKey {
            namespace: namespace.to_string(),
            deployment: deployment.to_string(),
            revision: revision.to_string(),
            role: Role::parse(role)?,
            instance_id: instance_id.to_string(),
        })
    }
}

/// The prefix a router watches: a whole namespace, or one deployment in it.
pub fn discovery_prefix(namespace: &str, deployment: Option<&str>) -> String {
    match deployment {
        Some(deployment) => format!("{ROOT}/{namespace}/{deployment}/"),
        None => format!("{ROOT}/{namespace}/"),
    }
}

/// Whether a name can be one path segment of a key (no `/`, not empty).
pub fn is_valid_segment(segment: &str) -> bool {
    !segment.is_empty() && !segment.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_parses_the_contract_layout() {
        let key = RegistryKey {
            namespace: "prod".into(),
            deployment: "llama".into(),
            revision: "7".into(),
            role: Role::Decode,
            instance_id: "pod-uid-1".into(),
        };
        assert_eq!(key.render(), "/dlengine/prod/llama/7/decode/pod-uid-1");
        assert_eq!(RegistryKey::parse(&key.render()), Some(key));
    }

    #[test]
    fn rejects_foreign_keys() {
        for bad in ["/dlengine/a/b/c/decode", "/other/a/b/c/decode/x", "/dlengine/a/b/c/chef/x", "/dlengine/a//c/decode/x"] {
            assert_eq!(RegistryKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefixes_end_in_a_slash() {
        assert_eq!(discovery_prefix("ns", None), "/dlengine/ns/");
        assert_eq!(discovery_prefix("ns", Some("d")), "/dlengine/ns/d/");
    }
}
