//! A chat request to prompt tokens: validate the conversation and the tool settings,
//! render the chat template, tokenize without adding special tokens again (the template
//! wrote them), and decide which output parsers the answer needs.

use serde_json::Value;

use super::chat_template::{message_values, TemplateInput};
use super::output_parser::{prompt_opens_reasoning, ToolParserKind};
use super::state::Ready;
use crate::openai::chat::{ChatCompletionRequest, ChatMessage, MessageContent};
use crate::openai::tools::{ToolChoice, ToolChoiceMode};
use crate::openai::ApiError;

pub struct ChatPrompt {
    pub token_ids: Vec<u32>,
    /// Some(starts inside `<think>`) when the model's reasoning is split off.
    pub reasoning: Option<bool>,
    pub tool_parser: Option<&'static ToolParserKind>,
}

/// The conversation as template values, parsed from the body again so that maps keep
/// the client's key order (the typed request has been validated already).
#[derive(serde::Deserialize)]
struct TemplateSource {
    messages: minijinja::Value,
    #[serde(default)]
    tools: Option<minijinja::Value>,
}

pub fn chat_prompt(ready: &Ready, request: &ChatCompletionRequest, body: &[u8]) -> Result<ChatPrompt, ApiError> {
    check_messages(&request.messages)?;
    check_response_format(request.response_format.as_ref())?;
    let tools_on = tools_in_use(request)?;
    let template = ready.chat.template.as_ref().map_err(|why| ApiError::invalid_param("messages", why.clone()))?;
    let tool_parser = match (tools_on, ready.chat.tool_parser) {
        (false, _) => None,
        (true, Some(parser)) => Some(parser),
        (true, None) => {
            return Err(ApiError::unsupported(
                "tools",
                "this model's chat template uses no tool-call format this server can parse (known: hermes)",
            ))
        }
    };
    let continue_final = request.continue_final_message.unwrap_or(false);
    let add_generation_prompt = request.add_generation_prompt.unwrap_or(!continue_final);
    if continue_final && add_generation_prompt {
        return Err(ApiError::invalid_param(
            "continue_final_message",
            "continue_final_message and add_generation_prompt cannot both be true",
        ));
    }
    let source: TemplateSource = serde_json::from_slice(body)
        .map_err(|e| ApiError::internal(format!("the validated request did not parse again: {e}")))?;
    let input = TemplateInput {
        messages: message_values(&source.messages),
        tools: if tools_on { source.tools } else { None },
        add_generation_prompt,
        kwargs: request.chat_template_kwargs.clone().unwrap_or_default(),
    };
    let mut text = template.render(&input).map_err(|e| ApiError::invalid_param("messages", e.0))?;
    if continue_final {
        cut_after_final_message(&mut text, &request.messages)?;
    }
    let token_ids = ready
        .engine
        .tokenizer()
        .encode(&text, false)
        .map_err(|e| ApiError::internal(format!("cannot tokenize the rendered prompt: {e}")))?;
    let reasoning = ready.chat.reasoning.then(|| prompt_opens_reasoning(&text));
    Ok(ChatPrompt { token_ids, reasoning, tool_parser })
}

fn check_messages(messages: &[ChatMessage]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must contain at least one message"));
    }
    for (i, message) in messages.iter().enumerate() {
        let Some(MessageContent::Parts(parts)) = &message.content else { continue };
        for (j, part) in parts.iter().enumerate() {
            if part.kind != "text" {
                return Err(ApiError::unsupported(
                    format!("messages[{i}].content[{j}].type"),
                    format!("content parts of type `{}` are not supported; only `text`", part.kind),
                ));
            }
            if part.text.is_none() {
                return Err(ApiError::invalid_param(format!("messages[{i}].content[{j}].text"), "a text part needs `text`"));
            }
        }
    }
    Ok(())
}

fn check_response_format(format: Option<&Value>) -> Result<(), ApiError> {
    match format.and_then(|f| f.get("type")).and_then(Value::as_str) {
        None | Some("text") => Ok(()),
        Some(other) => Err(ApiError::unsupported(
            "response_format",
            format!("response_format `{other}` is not supported (no structured output); use `text`"),
        )),
    }
}

/// Whether the model is offered the tools, after checking `tool_choice` against them.
fn tools_in_use(request: &ChatCompletionRequest) -> Result<bool, ApiError> {
    let tools = request.tools.as_deref().unwrap_or_default();
    let choice = request.tool_choice.clone().unwrap_or(ToolChoice::Mode(ToolChoiceMode::Auto));
    let forced = match &choice {
        ToolChoice::Mode(ToolChoiceMode::None) => return Ok(false),
        ToolChoice::Mode(ToolChoiceMode::Auto) => return Ok(!tools.is_empty()),
        ToolChoice::Mode(ToolChoiceMode::Required) => "\"required\"".to_owned(),
        ToolChoice::Named(named) => {
            if !tools.iter().any(|t| t.function.name == named.function.name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("tool_choice names `{}`, which is not among the tools", named.function.name),
                ));
            }
            format!("the named function `{}`", named.function.name)
        }
    };
    if tools.is_empty() {
        return Err(ApiError::invalid_param("tool_choice", format!("tool_choice {forced} needs `tools`")));
    }
    Err(ApiError::unsupported(
        "tool_choice",
        format!("tool_choice {forced} needs guided decoding, which this server does not implement; use \"auto\""),
    ))
}

/// For `continue_final_message`: the prompt ends where the last message's text ends, so
/// the model continues it instead of starting a new turn.
fn cut_after_final_message(text: &mut String, messages: &[ChatMessage]) -> Result<(), ApiError> {
    let last = messages.last().and_then(|m| match &m.content {
        Some(MessageContent::Text(t)) if !t.is_empty() => Some(t.as_str()),
        _ => None,
    });
    let at = last.and_then(|content| text.rfind(content).map(|pos| pos + content.len()));
    match at {
        Some(end) => {
            text.truncate(end);
            Ok(())
        }
        None => Err(ApiError::invalid_param(
            "continue_final_message",
            "the final message needs text content that the chat template reproduces",
        )),
    }
}
