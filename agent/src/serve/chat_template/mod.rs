//! Chat templates: the Jinja template in `tokenizer_config.json`, rendered with minijinja
//! the way Hugging Face transformers renders it (trim/lstrip blocks, Python string
//! methods, `raise_exception`, `strftime_now`, Python-style `tojson`).

mod python_json;
mod variables;

use minijinja::{Environment, Error, ErrorKind};

pub use variables::{message_values, TemplateInput};

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Vec<(&'static str, String)>,
}

/// Rendering failed: a `raise_exception` in the template (the client's conversation is
/// not one the template accepts) or a template bug.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` are exposed as variables (`bos_token`, ...).
    pub fn new(source: String, special_tokens: Vec<(&'static str, String)>) -> Result<Self, Error> {
        let mut env = Environment::new();
        // transformers' environment: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", python_json::tojson);
        env.add_template_owned(TEMPLATE_NAME, source)?;
        Ok(Self { env, special_tokens })
    }

    pub fn render(&self, input: &TemplateInput) -> Result<String, RenderError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| RenderError(describe(&e)))?;
        let context = input.context(&self.special_tokens);
        template.render(context).map_err(|e| RenderError(describe(&e)))
    }
}

fn raise_exception(message: String) -> Result<minijinja::Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
}

/// Marks errors raised on purpose by the template, so their text is shown as is.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the chat template")
    }
}

impl std::error::Error for Raised {}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// The template's own message for `raise_exception`, else minijinja's with its location.
fn describe(error: &Error) -> String {
    let raised = std::error::Error::source(error).is_some_and(|s| s.is::<Raised>());
    match (raised, error.detail()) {
        (true, Some(detail)) => detail.to_owned(),
        _ => format!("chat template error: {error:#}"),
    }
}

#[cfg(test)]
mod tests;
