use crate::registry::RegistryError;
use crate::render::RenderError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("rendering: {0}")]
    Render(#[from] RenderError),
    #[error("registry cleanup: {0}")]
    Registry(#[from] RegistryError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("serialising {what}: {source}")]
    Serialise { what: String, source: serde_json::Error },
    #[error("object has no {0}")]
    MissingField(&'static str),
}

impl Error {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Render(_) => "render",
            Error::Registry(_) => "registry",
            Error::Finalizer(_) => "finalizer",
            Error::Serialise { .. } => "serialise",
            Error::MissingField(_) => "missing_field",
        }
    }
}
