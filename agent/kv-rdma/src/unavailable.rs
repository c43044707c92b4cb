//! The device API of a build without the `rdma` feature: the same types and signatures,
//! so callers compile either way, but nothing can be opened. [`Device::open`] and
//! [`Device::list`] fail with [`RdmaError::RdmaUnavailable`]; since no `Device` can exist,
//! no other object can either (each holds an uninhabited value).

use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::BorrowedFd;

use crate::config::{Access, DeviceLimits, GidSelector, QpConfig, ReadOptions, TransferStats};
use crate::error::{RdmaError, Result};
use crate::meta::{EndpointInfo, QpInfo, RemoteRegion};
use crate::plan::{LocalRegion, ReadPlan};

#[derive(Debug, Clone, Copy)]
enum Never {}

#[derive(Debug, Clone)]
pub struct Device {
    never: Never,
}

impl Device {
    pub fn list() -> Result<Vec<String>> {
        Err(RdmaError::RdmaUnavailable)
    }

    pub fn open(_name: Option<&str>) -> Result<Device> {
        Err(RdmaError::RdmaUnavailable)
    }

    pub fn name(&self) -> &str {
        match self.never {}
    }

    pub fn limits(&self) -> DeviceLimits {
        match self.never {}
    }

    pub fn endpoint(&self, _port: u8, _gid: GidSelector) -> Result<EndpointInfo> {
        match self.never {}
    }

    pub fn alloc_pd(&self) -> Result<ProtectionDomain> {
        match self.never {}
    }
}

#[derive(Debug, Clone)]
pub struct ProtectionDomain {
    never: Never,
}

impl ProtectionDomain {
    pub fn device(&self) -> &str {
        match self.never {}
    }

    /// # Safety
    /// As with the `rdma` build: the range must stay allocated while registered.
    pub unsafe fn register_host(&self, _addr: *mut u8, _len: usize, _access: Access) -> Result<MemoryRegion> {
        match self.never {}
    }

    /// # Safety
    /// As with the `rdma` build: the exported memory must stay allocated while registered.
    pub unsafe fn register_dmabuf(
        &self,
        _fd: BorrowedFd<'_>,
        _offset: u64,
        _len: usize,
        _iova: u64,
        _access: Access,
    ) -> Result<MemoryRegion> {
        match self.never {}
    }

    pub fn create_qp(&self, _local: &EndpointInfo, _config: &QpConfig) -> Result<QueuePair> {
        match self.never {}
    }
}

#[derive(Debug)]
pub struct MemoryRegion {
    never: Never,
}

impl MemoryRegion {
    pub fn addr(&self) -> u64 {
        match self.never {}
    }
    pub fn len(&self) -> u64 {
        match self.never {}
    }
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }
    pub fn lkey(&self) -> u32 {
        match self.never {}
    }
    pub fn rkey(&self) -> u32 {
        match self.never {}
    }
    pub fn remote_region(&self) -> RemoteRegion {
        match self.never {}
    }
    pub fn local_region(&self) -> LocalRegion {
        match self.never {}
    }
}

#[derive(Debug)]
pub struct QueuePair {
    never: Never,
}

impl QueuePair {
    pub fn info(&self) -> QpInfo {
        match self.never {}
    }
    pub fn qp_num(&self) -> u32 {
        match self.never {}
    }
    pub fn local_endpoint(&self) -> &EndpointInfo {
        match self.never {}
    }
    pub fn max_send_wr(&self) -> u32 {
        match self.never {}
    }
    pub fn max_message_bytes(&self) -> u32 {
        match self.never {}
    }
    pub fn is_connected(&self) -> bool {
        match self.never {}
    }
    pub fn unusable_reason(&self) -> Option<&str> {
        match self.never {}
    }
    pub fn connect(&mut self, _remote: &EndpointInfo, _remote_qp: &QpInfo) -> Result<()> {
        match self.never {}
    }
}

pub struct ReadTransfer<'a> {
    never: Never,
    _borrows: PhantomData<(&'a mut [QueuePair], &'a ReadPlan)>,
}

impl<'a> ReadTransfer<'a> {
    /// Always fails: an empty slice of queue pairs is the only one that exists here.
    pub fn start(_qps: &'a mut [QueuePair], _plan: &'a ReadPlan, _options: ReadOptions) -> Result<Self> {
        Err(RdmaError::RdmaUnavailable)
    }
    pub fn progress(&mut self) -> Result<Range<u32>> {
        match self.never {}
    }
    pub fn progress_below(&mut self, _layers_ready: u32) -> Result<Range<u32>> {
        match self.never {}
    }
    pub fn layers_complete(&self) -> u32 {
        match self.never {}
    }
    pub fn is_done(&self) -> bool {
        match self.never {}
    }
    pub fn wait(self, _on_layers: impl FnMut(Range<u32>)) -> Result<TransferStats> {
        match self.never {}
    }
    pub fn wait_gated(self, _layers_ready: impl FnMut() -> Result<u32>, _on_layers: impl FnMut(Range<u32>)) -> Result<TransferStats> {
        match self.never {}
    }
}

pub fn read_blocks(_qps: &mut [QueuePair], _plan: &ReadPlan, _options: ReadOptions) -> Result<TransferStats> {
    Err(RdmaError::RdmaUnavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_operations_report_the_missing_feature() {
        assert!(matches!(Device::open(None), Err(RdmaError::RdmaUnavailable)));
        assert!(matches!(Device::open(Some("mlx5_0")), Err(RdmaError::RdmaUnavailable)));
        assert!(matches!(Device::list(), Err(RdmaError::RdmaUnavailable)));
        let plan = ReadPlan::default();
        assert!(matches!(ReadTransfer::start(&mut [], &plan, ReadOptions::default()), Err(RdmaError::RdmaUnavailable)));
        assert!(matches!(read_blocks(&mut [], &plan, ReadOptions::default()), Err(RdmaError::RdmaUnavailable)));
        let msg = Device::open(None).unwrap_err().to_string();
        assert!(msg.contains("built without the `rdma` feature"), "{msg}");
    }
}
