//! Reliable-connected queue pairs with their send completion queue.

use std::ffi::c_int;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::device::Context;
use super::memory::{PdInner, ProtectionDomain};
use super::sys;
use crate::config::QpConfig;
use crate::error::{RdmaError, Result};
use crate::meta::{EndpointInfo, LinkLayer, QpInfo};

struct CompletionQueue {
    raw: *mut sys::ibv_cq,
    ctx: Arc<Context>,
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_create_cq; the QP using it was destroyed first.
        let rc = unsafe { sys::ibv_destroy_cq(self.raw) };
        if rc != 0 {
            tracing::warn!(device = %self.ctx.name, error = %io::Error::from_raw_os_error(rc), "ibv_destroy_cq failed");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum QpState {
    /// Created and moved to INIT; waiting for the peer's info.
    Init,
    Connected {
        peer: String,
    },
    /// In (or forced into) the error state; only good for dropping.
    Unusable {
        reason: String,
    },
}

/// An RC queue pair used to issue RDMA READs (and to answer them: the prefill side creates
/// the same kind of QP, connects it, and never posts). Destroyed on drop, before its CQ.
pub struct QueuePair {
    raw: *mut sys::ibv_qp,
    // Field order matters for drop: the QP is destroyed in Drop::drop, then the CQ, then
    // the PD reference.
    cq: CompletionQueue,
    _pd: Arc<PdInner>,
    local: EndpointInfo,
    config: QpConfig,
    qp_num: u32,
    psn: u32,
    max_send_wr: u32,
    max_msg_sz: u32,
    responder_resources: u8,
    initiator_depth: u8,
    state: QpState,
}

// SAFETY: posting and polling need `&mut self`, so one thread at a time drives the QP;
// moving it between threads is fine for libibverbs.
unsafe impl Send for QueuePair {}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_create_qp and is destroyed once.
        let rc = unsafe { sys::ibv_destroy_qp(self.raw) };
        if rc != 0 {
            tracing::warn!(device = %self.local.device, qp = self.qp_num, error = %io::Error::from_raw_os_error(rc), "ibv_destroy_qp failed");
        }
    }
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("device", &self.local.device)
            .field("qp_num", &self.qp_num)
            .field("state", &self.state)
            .field("max_send_wr", &self.max_send_wr)
            .finish()
    }
}

fn random_psn() -> u32 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let seed = (CALLS.fetch_add(1, Ordering::Relaxed), std::time::SystemTime::now(), std::process::id());
    RandomState::new().hash_one(seed) as u32 & 0x00ff_ffff
}

fn clamp_u8(want: u8, device_max: u32) -> u8 {
    (want as u32).min(device_max).clamp(1, u8::MAX as u32) as u8
}

impl ProtectionDomain {
    /// Creates an RC queue pair on `local`'s port (from [`Device::endpoint`](super::Device::endpoint))
    /// with its own send completion queue, and moves it to INIT. Connect it with
    /// [`QueuePair::connect`] once the peer's [`QpInfo`] is known.
    pub fn create_qp(&self, local: &EndpointInfo, config: &QpConfig) -> Result<QueuePair> {
        let ctx = &self.inner.ctx;
        if local.device != ctx.name {
            return Err(RdmaError::InvalidArgument(format!(
                "endpoint of device {} used to create a QP on {}",
                local.device, ctx.name
            )));
        }
        if config.max_send_wr == 0 || config.retry_cnt > 7 || config.timeout > 31 {
            return Err(RdmaError::InvalidArgument(format!("bad QP config {config:?}")));
        }
        let port = ctx.active_port(local.port)?;
        let limits = ctx.limits;
        // The CQ gets one entry per send WR: even when every WR completes in error (each
        // then produces a CQE, signalled or not), the CQ cannot overflow.
        let depth = config.max_send_wr.min(limits.max_qp_wr.max(1)).min(limits.max_cqe.max(1));
        // SAFETY: the context is open; no channel, no CQ context.
        let raw_cq =
            unsafe { sys::ibv_create_cq(ctx.raw, depth as c_int, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if raw_cq.is_null() {
            return Err(ctx.verbs_error("ibv_create_cq", io::Error::last_os_error(), format!("{depth} entries")));
        }
        let cq = CompletionQueue { raw: raw_cq, ctx: ctx.clone() };

        // SAFETY: zero is valid for every field (null pointers, zero counts).
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.raw;
        init.recv_cq = cq.raw; // required by RC; nothing is ever posted to the receive queue
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.qp_type = sys::IBV_QPT_RC;
        init.sq_sig_all = 0; // only the last WR of each batch asks for a completion
                             // SAFETY: the PD and CQ are alive; init is a valid attribute block.
        let raw = unsafe { sys::ibv_create_qp(self.inner.raw, &mut init) };
        if raw.is_null() {
            return Err(ctx.verbs_error(
                "ibv_create_qp",
                io::Error::last_os_error(),
                format!("send queue depth {depth}"),
            ));
        }
        // SAFETY: raw is a live QP.
        let qp_num = unsafe { (*raw).qp_num };
        let mut qp = QueuePair {
            raw,
            cq,
            _pd: self.inner.clone(),
            local: local.clone(),
            config: *config,
            qp_num,
            psn: random_psn(),
            max_send_wr: depth,
            // 0 would mean "not reported"; the IB spec's ceiling is 2^31.
            max_msg_sz: if port.max_msg_sz == 0 { 1 << 31 } else { port.max_msg_sz },
            responder_resources: clamp_u8(config.responder_resources, limits.max_qp_rd_atom),
            initiator_depth: clamp_u8(config.initiator_depth, limits.max_qp_init_rd_atom),
            state: QpState::Init,
        };

        // SAFETY: plain data.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = local.port;
        // The peer READs through this QP's responder side (prefill); harmless on decode,
        // whose regions are registered without REMOTE_READ.
        attr.qp_access_flags = sys::IBV_ACCESS_REMOTE_READ;
        qp.modify(
            &mut attr,
            sys::IBV_QP_STATE | sys::IBV_QP_PKEY_INDEX | sys::IBV_QP_PORT | sys::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(RESET->INIT)",
        )?;
        Ok(qp)
    }
}

impl QueuePair {
    /// What the peer needs to connect its QP to this one.
    pub fn info(&self) -> QpInfo {
        QpInfo {
            qp_num: self.qp_num,
            psn: self.psn,
            responder_resources: self.responder_resources,
            initiator_depth: self.initiator_depth,
        }
    }

    pub fn qp_num(&self) -> u32 {
        self.qp_num
    }

    pub fn local_endpoint(&self) -> &EndpointInfo {
        &self.local
    }

    /// Send queue depth: most READs posted and not completed.
    pub fn max_send_wr(&self) -> u32 {
        self.max_send_wr
    }

    /// Largest message the port accepts (`max_msg_sz`).
    pub fn max_message_bytes(&self) -> u32 {
        self.max_msg_sz
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, QpState::Connected { .. })
    }

    /// Why the QP can no longer be used, if it cannot.
    pub fn unusable_reason(&self) -> Option<&str> {
        match &self.state {
            QpState::Unusable { reason } => Some(reason),
            _ => None,
        }
    }

    /// Connects to the peer's QP: INIT -> RTR (ready to receive) -> RTS (ready to send).
    /// Both sides call this with the other's endpoint and QP info.
    pub fn connect(&mut self, remote: &EndpointInfo, remote_qp: &QpInfo) -> Result<()> {
        match &self.state {
            QpState::Init => {}
            QpState::Connected { peer } => {
                return Err(RdmaError::InvalidArgument(format!("QP {} is already connected to {peer}", self.qp_num)))
            }
            QpState::Unusable { reason } => return Err(self.unusable(reason.clone())),
        }
        remote.validate()?;
        remote_qp.validate()?;
        let peer = format!("{} port {} QP {}", remote.device, remote.port, remote_qp.qp_num);
        let incompatible = |reason: String| RdmaError::Incompatible { peer: peer.clone(), reason };
        let (l, r) = (self.local.link_layer, remote.link_layer);
        if l != LinkLayer::Unspecified && r != LinkLayer::Unspecified && l != r {
            return Err(incompatible(format!("link layers differ (local {l:?}, remote {r:?})")));
        }
        // RoCE has no LIDs: packets are routed by GID (a GRH is mandatory). On InfiniBand a
        // LID reaches the peer inside the subnet; the GRH is only needed without one.
        let ethernet = l == LinkLayer::Ethernet || r == LinkLayer::Ethernet;
        let use_grh = ethernet || remote.lid == 0;
        if use_grh && remote.gid.is_zero() {
            return Err(incompatible("the peer advertises no GID to route to".into()));
        }

        // SAFETY: plain data.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::IBV_QPS_RTR;
        attr.path_mtu = self.local.mtu.min(remote.mtu).to_ibv();
        attr.dest_qp_num = remote_qp.qp_num;
        attr.rq_psn = remote_qp.psn;
        attr.max_dest_rd_atomic = self.responder_resources;
        attr.min_rnr_timer = 12; // 0.64 ms; READs never wait on receive buffers anyway
        attr.ah_attr.dlid = if ethernet { 0 } else { remote.lid };
        attr.ah_attr.sl = self.config.service_level;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = self.local.port;
        if use_grh {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = remote.gid.0;
            attr.ah_attr.grh.sgid_index = self.local.gid_index;
            attr.ah_attr.grh.hop_limit = self.config.hop_limit;
            attr.ah_attr.grh.traffic_class = self.config.traffic_class;
            attr.ah_attr.grh.flow_label = 0;
        }
        self.modify(
            &mut attr,
            sys::IBV_QP_STATE
                | sys::IBV_QP_AV
                | sys::IBV_QP_PATH_MTU
                | sys::IBV_QP_DEST_QPN
                | sys::IBV_QP_RQ_PSN
                | sys::IBV_QP_MAX_DEST_RD_ATOMIC
                | sys::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(INIT->RTR)",
        )?;

        // SAFETY: plain data.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::IBV_QPS_RTS;
        attr.timeout = self.config.timeout;
        attr.retry_cnt = self.config.retry_cnt;
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        // Never more READs in flight than the peer agreed to answer.
        attr.max_rd_atomic = self.initiator_depth.min(remote_qp.responder_resources).max(1);
        if let Err(e) = self.modify(
            &mut attr,
            sys::IBV_QP_STATE
                | sys::IBV_QP_TIMEOUT
                | sys::IBV_QP_RETRY_CNT
                | sys::IBV_QP_RNR_RETRY
                | sys::IBV_QP_SQ_PSN
                | sys::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTR->RTS)",
        ) {
            // RTR cannot go back to INIT: the QP is spent.
            self.mark_unusable("moving to RTS failed");
            return Err(e);
        }
        self.state = QpState::Connected { peer };
        Ok(())
    }

    fn modify(&mut self, attr: &mut sys::ibv_qp_attr, mask: u32, op: &'static str) -> Result<()> {
        // SAFETY: raw is a live QP; attr is a valid attribute block for `mask`.
        let rc = unsafe { sys::ibv_modify_qp(self.raw, attr, mask as c_int) };
        if rc != 0 {
            let hint = if op.contains("RTR") {
                format!(
                    "check the peer's GID/LID, GID index {} and MTU; RoCE needs a GID bound to an IP address",
                    self.local.gid_index
                )
            } else {
                String::new()
            };
            return Err(self.cq.ctx.verbs_error(op, io::Error::from_raw_os_error(rc), hint));
        }
        Ok(())
    }

    pub(crate) fn unusable(&self, reason: String) -> RdmaError {
        RdmaError::QpUnusable { device: self.local.device.clone(), qp_num: self.qp_num, reason }
    }

    /// Fails unless the QP is connected and healthy.
    pub(crate) fn ensure_connected(&self) -> Result<()> {
        match &self.state {
            QpState::Connected { .. } => Ok(()),
            QpState::Init => Err(self.unusable("not connected yet".into())),
            QpState::Unusable { reason } => Err(self.unusable(reason.clone())),
        }
    }

    /// Forces the QP into the error state: the HCA stops processing it, and every
    /// outstanding work request is flushed to the CQ with an error status.
    pub(crate) fn mark_unusable(&mut self, reason: &str) {
        if matches!(self.state, QpState::Unusable { .. }) {
            return;
        }
        // SAFETY: plain data.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::IBV_QPS_ERR;
        if let Err(e) = self.modify(&mut attr, sys::IBV_QP_STATE, "ibv_modify_qp(->ERR)") {
            tracing::warn!(qp = self.qp_num, error = %e, "could not move QP to the error state");
        }
        self.state = QpState::Unusable { reason: reason.to_string() };
    }

    /// Posts a chain of send work requests. On failure returns the errno and the index of
    /// the first request that was not posted.
    pub(crate) fn post_send(&mut self, wrs: &mut [sys::ibv_send_wr]) -> std::result::Result<(), (io::Error, usize)> {
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive; `wrs` is a linked chain whose SGEs the caller keeps alive
        // for the call (the provider copies them into the send queue before returning).
        let rc = unsafe { sys::dlk_post_send(self.raw, wrs.as_mut_ptr(), &mut bad) };
        if rc == 0 {
            return Ok(());
        }
        let first_bad = if bad.is_null() {
            0
        } else {
            // SAFETY: bad points into `wrs`.
            (unsafe { bad.offset_from(wrs.as_ptr()) }).clamp(0, wrs.len() as isize) as usize
        };
        Err((io::Error::from_raw_os_error(rc), first_bad))
    }

    /// Polls the send CQ into `wcs`; returns how many completions were written.
    pub(crate) fn poll(&mut self, wcs: &mut [sys::ibv_wc]) -> Result<usize> {
        let n = wcs.len().min(c_int::MAX as usize) as c_int;
        // SAFETY: the CQ is alive; wcs has room for n entries.
        let got = unsafe { sys::dlk_poll_cq(self.cq.raw, n, wcs.as_mut_ptr()) };
        if got < 0 {
            return Err(self.cq.ctx.verbs_error("ibv_poll_cq", io::Error::other(format!("returned {got}")), ""));
        }
        Ok(got as usize)
    }

    pub(crate) fn device_name(&self) -> &str {
        &self.local.device
    }
}
