//! Chat answers from engine deltas: each choice's text goes through its output parser
//! (reasoning, tool calls), then into stream chunks or one final message.

use std::sync::Arc;

use dlengine_engine::request::ChoiceDelta;
use dlengine_engine::tokenizer::Tokenizer;
use serde_json::Value;

use super::finish::{finish_reason, stop_reason};
use super::generation::Collector;
use super::logprobs::chat_logprobs;
use super::output_parser::{OutputParser, ParsedMessage, Piece, ToolParserKind};
use super::sse::{push_event, ChunkWriter};
use crate::openai::chat::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ResponseMessage, Role,
    CHAT_COMPLETION_CHUNK_OBJECT, CHAT_COMPLETION_OBJECT,
};
use crate::openai::logprobs::ChatLogprobs;
use crate::openai::tools::ToolCall;
use crate::openai::usage::Usage;
use crate::openai::ids;

/// Everything about a chat request the answer depends on.
pub struct ChatAnswer {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub n: usize,
    pub logprobs: bool,
    pub include_usage: bool,
    /// Some(starts inside `<think>`) when reasoning is split off.
    pub reasoning: Option<bool>,
    pub tool_parser: Option<&'static ToolParserKind>,
    pub tokenizer: Arc<Tokenizer>,
}

struct ChoiceState {
    parser: OutputParser,
    tool_calls: usize,
    started: bool,
}

/// What one delta of one choice turned into.
struct Absorbed {
    index: usize,
    pieces: Vec<Piece>,
    finish_reason: Option<String>,
    stop_reason: Option<Value>,
    logprobs: Option<ChatLogprobs>,
}

struct Choices {
    answer: ChatAnswer,
    states: Vec<ChoiceState>,
}

impl Choices {
    fn new(answer: ChatAnswer) -> Self {
        let states = (0..answer.n)
            .map(|_| ChoiceState {
                parser: OutputParser::new(answer.reasoning, answer.tool_parser),
                tool_calls: 0,
                started: false,
            })
            .collect();
        Self { answer, states }
    }

    fn absorb(&mut self, delta: ChoiceDelta) -> Option<Absorbed> {
        let index = delta.index as usize;
        let state = self.states.get_mut(index)?;
        let mut pieces = state.parser.push(&delta.text);
        if delta.finish_reason.is_some() {
            pieces.extend(state.parser.finish());
        }
        state.tool_calls += pieces.iter().filter(|p| matches!(p, Piece::ToolCall { .. })).count();
        let logprobs =
            self.answer.logprobs.then(|| chat_logprobs(&self.answer.tokenizer, &delta.logprobs));
        Some(Absorbed {
            index,
            pieces,
            finish_reason: delta.finish_reason.map(|r| finish_reason(r, state.tool_calls > 0)),
            stop_reason: stop_reason(delta.stop_reason),
            logprobs,
        })
    }
}

/// Streamed chat: `chat.completion.chunk` events.
pub struct ChatChunks {
    choices: Choices,
}

impl ChatChunks {
    pub fn new(answer: ChatAnswer) -> Self {
        Self { choices: Choices::new(answer) }
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        let a = &self.choices.answer;
        ChatCompletionChunk {
            id: a.id.clone(),
            object: CHAT_COMPLETION_CHUNK_OBJECT.into(),
            created: a.created,
            model: a.model.clone(),
            choices,
            usage,
        }
    }
}

impl ChunkWriter for ChatChunks {
    fn delta(&mut self, _source: usize, delta: ChoiceDelta, out: &mut Vec<u8>) {
        let Some(absorbed) = self.choices.absorb(delta) else { return };
        let state = &mut self.choices.states[absorbed.index];
        let mut chat_delta = ChatDelta::default();
        if !std::mem::replace(&mut state.started, true) {
            chat_delta.role = Some(Role::Assistant);
        }
        let first_call = state.tool_calls - count_calls(&absorbed.pieces);
        for piece in absorbed.pieces {
            match piece {
                Piece::Content(t) => chat_delta.content.get_or_insert_with(String::new).push_str(&t),
                Piece::Reasoning(t) => chat_delta.reasoning_content.get_or_insert_with(String::new).push_str(&t),
                Piece::ToolCall { name, arguments } => {
                    let index = first_call + chat_delta.tool_calls.len();
                    chat_delta.tool_calls.push(ToolCall::function(ids::tool_call_id(), name, arguments).into_delta(index));
                }
            }
        }
        if chat_delta.is_empty() && absorbed.finish_reason.is_none() && absorbed.logprobs.is_none() {
            return;
        }
        let choice = ChatChunkChoice {
            index: absorbed.index,
            delta: chat_delta,
            logprobs: absorbed.logprobs,
            finish_reason: absorbed.finish_reason,
            stop_reason: absorbed.stop_reason,
        };
        push_event(out, &self.chunk(vec![choice], None));
    }

    fn finish(&mut self, usage: Usage, out: &mut Vec<u8>) {
        if self.choices.answer.include_usage {
            push_event(out, &self.chunk(Vec::new(), Some(usage)));
        }
    }
}

fn count_calls(pieces: &[Piece]) -> usize {
    pieces.iter().filter(|p| matches!(p, Piece::ToolCall { .. })).count()
}

/// Non-streamed chat: one `chat.completion` once every choice finished.
pub struct ChatMessageCollector {
    choices: Choices,
    messages: Vec<ParsedMessage>,
    logprobs: Vec<Option<ChatLogprobs>>,
    endings: Vec<(Option<String>, Option<Value>)>,
}

impl ChatMessageCollector {
    pub fn new(answer: ChatAnswer) -> Self {
        let n = answer.n;
        Self {
            choices: Choices::new(answer),
            messages: vec![ParsedMessage::default(); n],
            logprobs: vec![None; n],
            endings: vec![(None, None); n],
        }
    }
}

impl Collector for ChatMessageCollector {
    type Output = ChatCompletionResponse;

    fn add(&mut self, _source: usize, delta: ChoiceDelta) {
        let Some(absorbed) = self.choices.absorb(delta) else { return };
        let i = absorbed.index;
        self.messages[i].add(absorbed.pieces);
        if let Some(lp) = absorbed.logprobs {
            self.logprobs[i].get_or_insert_with(ChatLogprobs::default).content.extend(lp.content);
        }
        if absorbed.finish_reason.is_some() {
            self.endings[i] = (absorbed.finish_reason, absorbed.stop_reason);
        }
    }

    fn finish(self, usage: Usage) -> ChatCompletionResponse {
        let choices = self
            .messages
            .into_iter()
            .zip(self.logprobs)
            .zip(self.endings)
            .enumerate()
            .map(|(index, ((message, logprobs), (finish_reason, stop_reason)))| ChatChoice {
                index,
                message: response_message(message),
                logprobs,
                finish_reason,
                stop_reason,
            })
            .collect();
        let a = &self.choices.answer;
        ChatCompletionResponse {
            id: a.id.clone(),
            object: CHAT_COMPLETION_OBJECT.into(),
            created: a.created,
            model: a.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }
}

fn response_message(parsed: ParsedMessage) -> ResponseMessage {
    let has_calls = !parsed.tool_calls.is_empty();
    ResponseMessage {
        role: Role::Assistant,
        // OpenAI sends null content for a reply made only of tool calls.
        content: if parsed.content.is_empty() && has_calls { None } else { Some(parsed.content) },
        reasoning_content: (!parsed.reasoning.is_empty()).then_some(parsed.reasoning),
        tool_calls: parsed
            .tool_calls
            .into_iter()
            .map(|(name, arguments)| ToolCall::function(ids::tool_call_id(), name, arguments))
            .collect(),
    }
}

#[cfg(test)]
mod tests;
