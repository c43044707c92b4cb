//! Sampling on the device: logits processing (bans, penalties), the seeded draw, and
//! log-probabilities, one block per row; only token ids and requested log-probabilities
//! come back to the host.

use std::collections::HashMap;

use cudarc::driver::result;
use cudarc::driver::sys::{CUfunction, CUstream};
use dlengine_engine::sampler::{SampledToken, SamplingRow};

use crate::error::{op_error, OpContext, Result};
use crate::launch::{launch, Arg, Launch};
use crate::memory::{Lease, PinnedBuffer, Pool};
use crate::tensor::CudaTensor;

const THREADS: u32 = 1024;
/// Top log-probabilities per row the kernel writes (MAX_LOGPROBS).
const TOP: usize = 20;

/// Must match `struct RowParams` in sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RowParams {
    logit_row: i32,
    top_k: i32,
    temperature: f32,
    top_p: f32,
    min_p: f32,
    num_logprobs: i32,
    seed: u64,
    step: u64,
}

pub struct Sampler {
    sample: CUfunction,
    logprobs: CUfunction,
    adjust: CUfunction,
    staging: PinnedBuffer,
}

// SAFETY: function handles are plain driver handles.
unsafe impl Send for Sampler {}

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data values (#[repr(C)] structs of ints/floats, or primitives).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Per-(logit row, token) adjustments: repetition factor and additive term.
fn adjustments(rows: &[SamplingRow<'_>]) -> (Vec<i32>, Vec<i32>, Vec<f32>, Vec<f32>) {
    let (mut r, mut ids, mut rep, mut add) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut seen_rows = std::collections::HashSet::new();
    for row in rows {
        // Rows sharing logits (the n samples of one request) share their adjustments.
        if !seen_rows.insert(row.logit_row) || (row.banned_tokens.is_empty() && !row.has_penalties()) {
            continue;
        }
        let mut per_token: HashMap<u32, (f32, f32)> = HashMap::new();
        if row.repetition_penalty != 1.0 {
            for &t in row.prompt_tokens.iter().chain(row.output_tokens) {
                per_token.entry(t).or_insert((1.0, 0.0)).0 = row.repetition_penalty;
            }
        }
        if row.presence_penalty != 0.0 || row.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in row.output_tokens {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                per_token.entry(t).or_insert((1.0, 0.0)).1 -= row.presence_penalty + row.frequency_penalty * c as f32;
            }
        }
        for &t in row.banned_tokens {
            per_token.entry(t).or_insert((1.0, 0.0)).1 = f32::NEG_INFINITY;
        }
        for (t, (factor, delta)) in per_token {
            r.push(row.logit_row as i32);
            ids.push(t as i32);
            rep.push(factor);
            add.push(delta);
        }
    }
    (r, ids, rep, add)
}

impl Sampler {
    pub fn new(sample: CUfunction, logprobs: CUfunction, adjust: CUfunction) -> Result<Self> {
        Ok(Self { sample, logprobs, adjust, staging: PinnedBuffer::new(1 << 20)? })
    }

    /// Copies `data` to a fresh pool block via the pinned staging area at `offset`.
    fn upload<T: Copy>(&mut self, pool: &Pool, stream: CUstream, offset: &mut usize, data: &[T]) -> Result<Lease> {
        let bytes = bytes_of(data);
        let lease = pool.alloc(bytes.len())?;
        if bytes.is_empty() {
            return Ok(lease);
        }
        let at = *offset;
        if at + bytes.len() > self.staging.bytes() {
            return Err(op_error("sample", "sampling inputs exceed the staging buffer"));
        }
        self.staging.as_mut_slice()[at..at + bytes.len()].copy_from_slice(bytes);
        *offset = (at + bytes.len()).next_multiple_of(64);
        let src = &self.staging.as_slice()[at..at + bytes.len()];
        // SAFETY: the block holds `bytes.len()` bytes; staging is pinned and untouched until
        // the stream is synchronised at the end of `sample`.
        unsafe { result::memcpy_htod_async(lease.ptr(), src, stream) }.op("uploading sampling inputs")?;
        Ok(lease)
    }

    fn grow_staging(&mut self, rows: &[SamplingRow<'_>]) -> Result<()> {
        let adjust: usize = rows.iter().map(|r| r.prompt_tokens.len() + r.output_tokens.len() + r.banned_tokens.len()).sum();
        let need = rows.len() * (std::mem::size_of::<RowParams>() * 2 + 4 + 4 + TOP * 8) + adjust * 16 + 4096;
        if need > self.staging.bytes() {
            self.staging = PinnedBuffer::new(need.next_power_of_two())?;
        }
        Ok(())
    }

    pub fn sample(&mut self, pool: &Pool, stream: CUstream, logits: &CudaTensor, rows: &[SamplingRow<'_>]) -> Result<Vec<SampledToken>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Staging is free: the previous step's read-back synchronised the stream, and every
        // step's prepare synchronises before it.
        self.grow_staging(rows)?;
        let vocab = logits.cols;
        let n = rows.len();
        let params: Vec<RowParams> = rows
            .iter()
            .map(|r| RowParams {
                logit_row: r.logit_row as i32,
                top_k: r.top_k.min(i32::MAX as usize) as i32,
                temperature: r.temperature,
                top_p: r.top_p,
                min_p: r.min_p,
                num_logprobs: r.num_logprobs.map_or(-1, |k| k.min(TOP) as i32),
                seed: r.seed,
                step: r.step,
            })
            .collect();
        let mut offset = 0;
        let params_dev = self.upload(pool, stream, &mut offset, &params)?;
        // Log-probabilities read the raw logits: copy those rows before adjusting.
        let lp_rows: Vec<usize> = (0..n).filter(|&i| rows[i].num_logprobs.is_some()).collect();
        let raw = self.copy_raw_rows(pool, stream, logits, rows, &lp_rows)?;
        self.adjust(pool, stream, logits, rows, &mut offset)?;
        let tokens = pool.alloc(n * 4)?;
        let cfg = Launch::new((n as u32, 1, 1), THREADS);
        launch(
            "sample",
            self.sample,
            stream,
            &cfg,
            vec![Arg::Ptr(logits.ptr), Arg::I32(vocab as i32), Arg::Ptr(params_dev.ptr()), Arg::Ptr(tokens.ptr())],
        )?;
        let lp = match &raw {
            Some(raw) => Some(self.logprobs(pool, stream, raw, vocab, &params, &lp_rows, &tokens, &mut offset)?),
            None => None,
        };
        self.read_back(stream, n, &tokens, lp, &lp_rows, rows, offset)
    }

    fn copy_raw_rows(
        &mut self,
        pool: &Pool,
        stream: CUstream,
        logits: &CudaTensor,
        rows: &[SamplingRow<'_>],
        lp_rows: &[usize],
    ) -> Result<Option<Lease>> {
        if lp_rows.is_empty() {
            return Ok(None);
        }
        let row_bytes = logits.cols * 2;
        let raw = pool.alloc(lp_rows.len() * row_bytes)?;
        for (j, &i) in lp_rows.iter().enumerate() {
            let src = logits.ptr + (rows[i].logit_row * row_bytes) as u64;
            // SAFETY: both ranges lie inside their allocations.
            unsafe { result::memcpy_dtod_async(raw.ptr() + (j * row_bytes) as u64, src, row_bytes, stream) }.op("copying logits")?;
        }
        Ok(Some(raw))
    }

    fn adjust(&mut self, pool: &Pool, stream: CUstream, logits: &CudaTensor, rows: &[SamplingRow<'_>], offset: &mut usize) -> Result<()> {
        let (r, ids, rep, add) = adjustments(rows);
        if r.is_empty() {
            return Ok(());
        }
        let count = r.len();
        let (r, ids, rep, add) = (
            self.upload(pool, stream, offset, &r)?,
            self.upload(pool, stream, offset, &ids)?,
            self.upload(pool, stream, offset, &rep)?,
            self.upload(pool, stream, offset, &add)?,
        );
        let cfg = Launch::new((count.div_ceil(256) as u32, 1, 1), 256);
        launch(
            "adjust_logits",
            self.adjust,
            stream,
            &cfg,
            vec![
                Arg::Ptr(logits.ptr),
                Arg::I32(logits.cols as i32),
                Arg::Ptr(r.ptr()),
                Arg::Ptr(ids.ptr()),
                Arg::Ptr(rep.ptr()),
                Arg::Ptr(add.ptr()),
                Arg::I32(count as i32),
            ],
        )?;
        // The leases return to the pool now; stream order keeps the kernel's reads safe.
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn logprobs(
        &mut self,
        pool: &Pool,
        stream: CUstream,
        raw: &Lease,
        vocab: usize,
        params: &[RowParams],
        lp_rows: &[usize],
        tokens: &Lease,
        offset: &mut usize,
    ) -> Result<(Lease, Lease, Lease)> {
        // Rows of the raw copy, in lp_rows order; tokens are read at the same index.
        let lp_params: Vec<RowParams> = lp_rows.iter().enumerate().map(|(j, &i)| RowParams { logit_row: j as i32, ..params[i] }).collect();
        let p = self.upload(pool, stream, offset, &lp_params)?;
        let m = lp_rows.len();
        // The kernel reads tokens[blockIdx.x]: gather this subset's tokens first.
        let sub_tokens = pool.alloc(m * 4)?;
        for (j, &i) in lp_rows.iter().enumerate() {
            // SAFETY: 4-byte copies inside the token buffers.
            unsafe { result::memcpy_dtod_async(sub_tokens.ptr() + 4 * j as u64, tokens.ptr() + 4 * i as u64, 4, stream) }.op("gathering tokens")?;
        }
        let (lp, top_ids, top_lp) = (pool.alloc(m * 4)?, pool.alloc(m * TOP * 4)?, pool.alloc(m * TOP * 4)?);
        launch(
            "logprobs",
            self.logprobs,
            stream,
            &Launch::new((m as u32, 1, 1), THREADS),
            vec![
                Arg::Ptr(raw.ptr()),
                Arg::I32(vocab as i32),
                Arg::Ptr(p.ptr()),
                Arg::Ptr(sub_tokens.ptr()),
                Arg::Ptr(lp.ptr()),
                Arg::Ptr(top_ids.ptr()),
                Arg::Ptr(top_lp.ptr()),
            ],
        )?;
        Ok((lp, top_ids, top_lp))
    }

    #[allow(clippy::too_many_arguments)]
    fn read_back(
        &mut self,
        stream: CUstream,
        n: usize,
        tokens: &Lease,
        lp: Option<(Lease, Lease, Lease)>,
        lp_rows: &[usize],
        rows: &[SamplingRow<'_>],
        offset: usize,
    ) -> Result<Vec<SampledToken>> {
        let m = lp_rows.len();
        let at_tokens = offset;
        let at_lp = at_tokens + n * 4;
        let at_ids = at_lp + m * 4;
        let at_top = at_ids + m * TOP * 4;
        if at_top + m * TOP * 4 > self.staging.bytes() {
            return Err(op_error("sample", "results exceed the staging buffer"));
        }
        let copies: Vec<(usize, u64, usize)> = std::iter::once((at_tokens, tokens.ptr(), n * 4))
            .chain(lp.iter().flat_map(|(a, b, c)| [(at_lp, a.ptr(), m * 4), (at_ids, b.ptr(), m * TOP * 4), (at_top, c.ptr(), m * TOP * 4)]))
            .collect();
        for (at, src, bytes) in copies {
            let dst = &mut self.staging.as_mut_slice()[at..at + bytes];
            // SAFETY: pinned destination of `bytes` bytes; synchronised right after.
            unsafe { result::memcpy_dtoh_async(dst, src, stream) }.op("reading sampled tokens")?;
        }
        // SAFETY: our stream.
        unsafe { result::stream::synchronize(stream) }.op("stream synchronize")?;
        let s = self.staging.as_slice();
        let int = |at: usize| i32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
        let float = |at: usize| f32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
        let mut out: Vec<SampledToken> =
            (0..n).map(|i| SampledToken { token: int(at_tokens + 4 * i) as u32, logprob: 0.0, top: Vec::new() }).collect();
        for (j, &i) in lp_rows.iter().enumerate() {
            let k = rows[i].num_logprobs.unwrap_or(0).min(TOP);
            out[i].logprob = float(at_lp + 4 * j);
            out[i].top = (0..k).map(|t| (int(at_ids + 4 * (j * TOP + t)) as u32, float(at_top + 4 * (j * TOP + t)))).collect();
        }
        Ok(out)
    }
}
