//! CUDA graphs of pure-decode steps, one per padded batch size: a whole forward pass
//! replays as one launch, which removes the per-kernel launch cost that dominates decode
//! of small models. Capture runs on our own (non-default) stream in relaxed mode.

use std::collections::HashMap;

use cudarc::driver::result;
use cudarc::driver::sys::{CUgraph, CUgraphExec, CUgraphInstantiate_flags, CUstream, CUstreamCaptureMode};

use crate::error::{op_error, OpContext, Result};
use crate::tensor::CudaTensor;

struct Graph {
    exec: CUgraphExec,
    graph: CUgraph,
    /// The captured forward's logits; their memory stays reserved for the replays.
    output: CudaTensor,
}

#[derive(Default)]
pub struct Graphs {
    graphs: HashMap<usize, Graph>,
    capturing: Option<usize>,
}

// SAFETY: graph handles are plain driver handles used with our context bound.
unsafe impl Send for Graphs {}

impl Graphs {
    pub fn is_capturing(&self) -> bool {
        self.capturing.is_some()
    }

    pub fn begin(&mut self, stream: CUstream, batch_size: usize) -> Result<()> {
        // SAFETY: our stream, not capturing already.
        unsafe { result::stream::begin_capture(stream, CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) }
            .op("begin graph capture")?;
        self.capturing = Some(batch_size);
        Ok(())
    }

    pub fn end(&mut self, stream: CUstream, batch_size: usize, output: CudaTensor) -> Result<()> {
        if self.capturing.take() != Some(batch_size) {
            return Err(op_error("end graph capture", format!("not capturing batch size {batch_size}")));
        }
        // SAFETY: ends the capture begun on this stream; the graph is instantiated once
        // and destroyed in Drop.
        unsafe {
            let graph = result::stream::end_capture(stream).op("end graph capture")?;
            let exec = result::graph::instantiate(graph, CUgraphInstantiate_flags(0)).op("instantiate graph")?;
            result::graph::upload(exec, stream).op("upload graph")?;
            self.graphs.insert(batch_size, Graph { exec, graph, output });
        }
        Ok(())
    }

    /// Launches the graph of `batch_size`; returns its logits.
    pub fn replay(&self, stream: CUstream, batch_size: usize) -> Result<&CudaTensor> {
        let g = self.graphs.get(&batch_size).ok_or_else(|| op_error("graph replay", format!("no graph for batch {batch_size}")))?;
        // SAFETY: instantiated graph, our stream.
        unsafe { result::graph::launch(g.exec, stream) }.op("graph launch")?;
        Ok(&g.output)
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        for (_, g) in self.graphs.drain() {
            // SAFETY: created in `end`, destroyed once.
            unsafe {
                let _ = result::graph::exec_destroy(g.exec);
                let _ = result::graph::destroy(g.graph);
            }
        }
    }
}

/// Decode batch sizes to capture, up to `max`: small sizes densely, larger ones sparsely.
pub fn ladder(max: usize) -> Vec<usize> {
    let mut sizes = vec![1, 2, 4, 8, 16, 24, 32];
    let mut next = 48;
    while next <= 512 {
        sizes.push(next);
        next += if next < 128 { 16 } else { 32 };
    }
    sizes.retain(|&s| s <= max);
    if max > 0 && !sizes.contains(&max) && max <= 512 {
        sizes.push(max);
    }
    sizes
}

#[cfg(test)]
mod tests {
    #[test]
    fn ladder_is_ascending_and_bounded() {
        let l = super::ladder(256);
        assert_eq!(&l[..7], &[1, 2, 4, 8, 16, 24, 32]);
        assert_eq!(*l.last().unwrap(), 256);
        assert!(l.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(super::ladder(20), vec![1, 2, 4, 8, 16, 20]);
    }
}
