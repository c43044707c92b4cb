//! Completions answers from engine deltas. A batched request's prompt `p`, sample `i`
//! becomes choice `p * n + i`, as OpenAI numbers them.

use std::sync::Arc;

use dlengine_engine::request::ChoiceDelta;
use dlengine_engine::tokenizer::Tokenizer;

use super::finish::{finish_reason, stop_reason};
use super::generation::Collector;
use super::logprobs::completion_logprobs;
use super::sse::{push_event, ChunkWriter};
use crate::openai::completion::{CompletionChoice, CompletionChunk, CompletionResponse, COMPLETION_OBJECT};
use crate::openai::usage::Usage;

pub struct CompletionAnswer {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub n: usize,
    /// Per prompt: its text when `echo` is on.
    pub echo: Vec<Option<String>>,
    pub logprobs: bool,
    pub include_usage: bool,
    pub tokenizer: Arc<Tokenizer>,
}

#[derive(Default, Clone)]
struct ChoiceState {
    started: bool,
    /// Characters of text so far (for logprobs' text_offset).
    chars: usize,
}

struct Choices {
    answer: CompletionAnswer,
    states: Vec<ChoiceState>,
}

impl Choices {
    fn new(answer: CompletionAnswer) -> Self {
        let states = vec![ChoiceState::default(); answer.n * answer.echo.len()];
        Self { answer, states }
    }

    /// One delta as the choice it adds to its answer.
    fn choice(&mut self, source: usize, delta: ChoiceDelta) -> Option<CompletionChoice> {
        let index = source * self.answer.n + delta.index as usize;
        let state = self.states.get_mut(index)?;
        let mut text = String::new();
        if !std::mem::replace(&mut state.started, true) {
            if let Some(echo) = self.answer.echo.get(source).and_then(Option::as_ref) {
                text.push_str(echo);
                state.chars += echo.chars().count();
            }
        }
        text.push_str(&delta.text);
        let logprobs = self
            .answer
            .logprobs
            .then(|| completion_logprobs(&self.answer.tokenizer, &delta.logprobs, &mut state.chars));
        Some(CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: delta.finish_reason.map(|r| finish_reason(r, false)),
            stop_reason: stop_reason(delta.stop_reason),
        })
    }
}

/// Streamed completions: one `text_completion` chunk per delta.
pub struct CompletionChunks {
    choices: Choices,
}

impl CompletionChunks {
    pub fn new(answer: CompletionAnswer) -> Self {
        Self { choices: Choices::new(answer) }
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> CompletionChunk {
        let a = &self.choices.answer;
        CompletionChunk {
            id: a.id.clone(),
            object: COMPLETION_OBJECT.into(),
            created: a.created,
            model: a.model.clone(),
            choices,
            usage,
        }
    }
}

impl ChunkWriter for CompletionChunks {
    fn delta(&mut self, source: usize, delta: ChoiceDelta, out: &mut Vec<u8>) {
        if let Some(choice) = self.choices.choice(source, delta) {
            if !choice.text.is_empty() || choice.finish_reason.is_some() || choice.logprobs.is_some() {
                push_event(out, &self.chunk(vec![choice], None));
            }
        }
    }

    fn finish(&mut self, usage: Usage, out: &mut Vec<u8>) {
        if self.choices.answer.include_usage {
            push_event(out, &self.chunk(Vec::new(), Some(usage)));
        }
    }
}

/// Non-streamed completions.
pub struct CompletionCollector {
    choices: Choices,
    answers: Vec<CompletionChoice>,
}

impl CompletionCollector {
    pub fn new(answer: CompletionAnswer) -> Self {
        let total = answer.n * answer.echo.len();
        let answers = (0..total)
            .map(|index| CompletionChoice { index, text: String::new(), logprobs: None, finish_reason: None, stop_reason: None })
            .collect();
        Self { choices: Choices::new(answer), answers }
    }
}

impl Collector for CompletionCollector {
    type Output = CompletionResponse;

    fn add(&mut self, source: usize, delta: ChoiceDelta) {
        let Some(part) = self.choices.choice(source, delta) else { return };
        let Some(answer) = self.answers.get_mut(part.index) else { return };
        answer.text.push_str(&part.text);
        if let Some(lp) = part.logprobs {
            answer.logprobs.get_or_insert_with(Default::default).extend(lp);
        }
        if part.finish_reason.is_some() {
            answer.finish_reason = part.finish_reason;
            answer.stop_reason = part.stop_reason;
        }
    }

    fn finish(self, usage: Usage) -> CompletionResponse {
        let a = &self.choices.answer;
        CompletionResponse {
            id: a.id.clone(),
            object: COMPLETION_OBJECT.into(),
            created: a.created,
            model: a.model.clone(),
            choices: self.answers,
            usage,
            system_fingerprint: None,
        }
    }
}
