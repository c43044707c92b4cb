//! Device-side step timing with CUDA events: time inside steps and idle time between
//! them (the host's share of the critical path).

use cudarc::driver::result;
use cudarc::driver::sys::{CUevent, CUevent_flags, CUstream};
use dlengine_engine::backend::DeviceTimeReport;

use crate::error::{OpContext, Result};

pub struct StepTimer {
    start: CUevent,
    end: CUevent,
    prev_end: CUevent,
    in_step: bool,
    have_prev: bool,
    report: DeviceTimeReport,
}

// SAFETY: event handles are plain driver handles.
unsafe impl Send for StepTimer {}

impl StepTimer {
    pub fn new() -> Result<Self> {
        let ev = || result::event::create(CUevent_flags::CU_EVENT_DEFAULT).op("creating an event");
        Ok(Self { start: ev()?, end: ev()?, prev_end: ev()?, in_step: false, have_prev: false, report: DeviceTimeReport::default() })
    }

    pub fn step_started(&mut self, stream: CUstream) -> Result<()> {
        // SAFETY: our events and stream.
        unsafe { result::event::record(self.start, stream) }.op("recording an event")?;
        self.in_step = true;
        Ok(())
    }

    /// Call after the stream was synchronised at the end of a step.
    pub fn step_finished(&mut self, stream: CUstream) -> Result<()> {
        if !self.in_step {
            return Ok(());
        }
        self.in_step = false;
        // SAFETY: events recorded on our stream; the stream is synchronised after `end`.
        unsafe {
            result::event::record(self.end, stream).op("recording an event")?;
            result::event::synchronize(self.end).op("event synchronize")?;
            self.report.busy_ms += result::event::elapsed(self.start, self.end).op("event time")? as f64;
            if self.have_prev {
                self.report.idle_between_steps_ms += result::event::elapsed(self.prev_end, self.start).op("event time")? as f64;
            }
            std::mem::swap(&mut self.end, &mut self.prev_end);
        }
        self.have_prev = true;
        self.report.steps += 1;
        Ok(())
    }

    pub fn report(&self) -> DeviceTimeReport {
        self.report
    }
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        for e in [self.start, self.end, self.prev_end] {
            // SAFETY: created in new, destroyed once.
            unsafe {
                let _ = result::event::destroy(e);
            }
        }
    }
}
