//! Turns a [`SchedulerOutput`] into the flattened [`StepInput`] a backend runs.

use crate::backend::StepInput;
use crate::scheduler::{Scheduler, SchedulerOutput};

pub fn build_step_input(scheduler: &Scheduler, out: &SchedulerOutput) -> StepInput {
    let block_size = scheduler.config().block_size;
    let seqs: Vec<_> = out.scheduled.iter().map(|s| (s, scheduler.seq(s.seq_id).expect("scheduled sequence"))).collect();
    let stride = seqs.iter().map(|(_, q)| q.block_table.len()).max().unwrap_or(0);
    let tokens = out.num_batched_tokens;
    let mut input = StepInput {
        token_ids: Vec::with_capacity(tokens),
        positions: Vec::with_capacity(tokens),
        slot_mapping: Vec::with_capacity(tokens),
        query_start: Vec::with_capacity(seqs.len() + 1),
        context_lens: Vec::with_capacity(seqs.len()),
        block_tables: vec![0; seqs.len() * stride],
        block_table_stride: stride,
        block_size,
        logit_rows: Vec::new(),
    };
    input.query_start.push(0);
    for (i, (s, seq)) in seqs.iter().enumerate() {
        let end = s.start + s.num_tokens;
        input.token_ids.extend_from_slice(&seq.token_ids[s.start..end]);
        for pos in s.start..end {
            input.positions.push(pos as u32);
            input.slot_mapping.push(seq.block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
        }
        input.query_start.push(input.token_ids.len() as u32);
        input.context_lens.push(end as u32);
        input.block_tables[i * stride..i * stride + seq.block_table.len()].copy_from_slice(&seq.block_table);
        if s.sample {
            input.logit_rows.push(input.token_ids.len() as u32 - 1);
        }
    }
    input
}
