//! Opening a device and describing one of its ports.

use std::ffi::c_int;
use std::io;
use std::sync::Arc;

use super::{c_str, sys};
use crate::config::{roce_gid_rank, DeviceLimits, GidKind, GidSelector};
use crate::error::{RdmaError, Result};
use crate::meta::{EndpointInfo, Gid, LinkLayer, Mtu};

/// An open device context (`ibv_context`).
pub(crate) struct Context {
    pub(crate) raw: *mut sys::ibv_context,
    pub(crate) name: String,
    pub(crate) limits: DeviceLimits,
}

// SAFETY: rdma-core's verbs are thread-safe on a context; the context is only freed in Drop,
// after every child (which holds an Arc to it) is gone.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_open_device and is closed exactly once.
        let rc = unsafe { sys::ibv_close_device(self.raw) };
        if rc != 0 {
            tracing::warn!(device = %self.name, error = %io::Error::last_os_error(), "ibv_close_device failed");
        }
    }
}

impl Context {
    pub(crate) fn verbs_error(&self, op: &'static str, source: io::Error, hint: impl Into<String>) -> RdmaError {
        RdmaError::Verbs { op, device: self.name.clone(), source, hint: hint.into() }
    }

    pub(crate) fn query_port(&self, port: u8) -> Result<sys::ibv_port_attr> {
        // SAFETY: zeroed is a valid ibv_port_attr (plain integers); the shim fills it.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: raw is an open context; attr is a live, correctly sized out-parameter.
        let rc = unsafe { sys::dlk_query_port(self.raw, port, &mut attr) };
        if rc != 0 {
            return Err(self.verbs_error(
                "ibv_query_port",
                io::Error::from_raw_os_error(rc),
                format!("port {port}; ports are numbered from 1"),
            ));
        }
        Ok(attr)
    }

    /// Like [`query_port`](Self::query_port), but the port must be ACTIVE.
    pub(crate) fn active_port(&self, port: u8) -> Result<sys::ibv_port_attr> {
        let attr = self.query_port(port)?;
        if attr.state != sys::IBV_PORT_ACTIVE {
            // SAFETY: returns a static string for any value.
            let state = c_str(unsafe { sys::ibv_port_state_str(attr.state) }, "unknown state");
            return Err(RdmaError::PortNotActive { device: self.name.clone(), port, state });
        }
        Ok(attr)
    }

    /// The GID entry at `index`; None for an empty slot.
    fn query_gid(&self, port: u8, index: u32) -> Result<Option<sys::ibv_gid_entry>> {
        // SAFETY: plain-data out-parameter.
        let mut entry: sys::ibv_gid_entry = unsafe { std::mem::zeroed() };
        // SAFETY: raw is an open context; entry is live.
        let rc = unsafe { sys::dlk_query_gid_ex(self.raw, port as u32, index, &mut entry) };
        match rc {
            0 => Ok(Some(entry)),
            ENODATA => Ok(None),
            rc => Err(self.verbs_error(
                "ibv_query_gid_ex",
                io::Error::from_raw_os_error(rc),
                format!("port {port}, GID index {index}"),
            )),
        }
    }
}

/// `ENODATA` on Linux: an empty GID table slot.
const ENODATA: c_int = 61;
/// `ENOSYS` on Linux: from ibv_get_device_list, no RDMA support in the kernel.
const ENOSYS: i32 = 38;

/// The device list from `ibv_get_device_list`, freed on drop.
struct DeviceList {
    list: *mut *mut sys::ibv_device,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<Self> {
        let mut n: c_int = 0;
        // SAFETY: n is a live out-parameter.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = io::Error::last_os_error();
            let detail = if e.raw_os_error() == Some(ENOSYS) {
                "the kernel has no RDMA support (ibv_get_device_list: ENOSYS)".to_string()
            } else {
                format!("ibv_get_device_list: {e}")
            };
            return Err(RdmaError::NoDevice { detail });
        }
        Ok(Self { list, len: n.max(0) as usize })
    }

    fn devices(&self) -> &[*mut sys::ibv_device] {
        // SAFETY: libibverbs returned `len` valid entries (NULL-terminated after them).
        unsafe { std::slice::from_raw_parts(self.list, self.len) }
    }

    fn names(&self) -> Vec<String> {
        // SAFETY: each entry is a valid device while the list is alive.
        self.devices().iter().map(|&d| c_str(unsafe { sys::ibv_get_device_name(d) }, "?")).collect()
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: list came from ibv_get_device_list; opened contexts keep their own references.
        unsafe { sys::ibv_free_device_list(self.list) };
    }
}

/// An open RDMA device. Cheap to clone; closed when the last clone and every object
/// created from it are dropped.
#[derive(Clone)]
pub struct Device {
    pub(crate) ctx: Arc<Context>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.ctx.name).field("limits", &self.ctx.limits).finish()
    }
}

impl Device {
    /// Names of the RDMA devices libibverbs sees (empty without devices or kernel support).
    pub fn list() -> Result<Vec<String>> {
        match DeviceList::get() {
            Ok(list) => Ok(list.names()),
            Err(RdmaError::NoDevice { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Opens the device called `name`, or the first one. Fails with
    /// [`RdmaError::NoDevice`] ("no RDMA device found; use --kv-transport tcp or cuda-ipc")
    /// when there is none.
    pub fn open(name: Option<&str>) -> Result<Device> {
        let list = DeviceList::get()?;
        let names = list.names();
        if names.is_empty() {
            return Err(RdmaError::NoDevice { detail: String::new() });
        }
        let index = match name {
            None => 0,
            Some(want) => names
                .iter()
                .position(|n| n == want)
                .ok_or_else(|| RdmaError::DeviceNotFound { name: want.to_string(), available: names.join(", ") })?,
        };
        let name = names[index].clone();
        // SAFETY: the device pointer is valid while `list` lives; the context stays valid after.
        let raw = unsafe { sys::ibv_open_device(list.devices()[index]) };
        if raw.is_null() {
            return Err(RdmaError::Verbs {
                op: "ibv_open_device",
                device: name,
                source: io::Error::last_os_error(),
                hint: "the process needs read/write access to /dev/infiniband/uverbs*".into(),
            });
        }
        let mut ctx = Context { raw, name, limits: DeviceLimits::default() };
        // SAFETY: plain-data out-parameter.
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: raw is open; attr is live.
        let rc = unsafe { sys::ibv_query_device(raw, &mut attr) };
        if rc != 0 {
            return Err(ctx.verbs_error("ibv_query_device", io::Error::from_raw_os_error(rc), ""));
        }
        let nonneg = |v: c_int| v.max(0) as u32;
        ctx.limits = DeviceLimits {
            max_qp_wr: nonneg(attr.max_qp_wr),
            max_cqe: nonneg(attr.max_cqe),
            max_qp_rd_atom: nonneg(attr.max_qp_rd_atom),
            max_qp_init_rd_atom: nonneg(attr.max_qp_init_rd_atom),
            max_mr_size: attr.max_mr_size,
        };
        Ok(Device { ctx: Arc::new(ctx) })
    }

    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    pub fn limits(&self) -> DeviceLimits {
        self.ctx.limits
    }

    /// Describes `port` (from 1) for peers: GID, LID, active MTU, link layer. The port must
    /// be ACTIVE.
    pub fn endpoint(&self, port: u8, gid: GidSelector) -> Result<EndpointInfo> {
        let attr = self.ctx.active_port(port)?;
        let link_layer = match attr.link_layer as u32 {
            sys::IBV_LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
            // Drivers that predate the field report UNSPECIFIED, which means InfiniBand.
            _ => LinkLayer::Infiniband,
        };
        let mtu = Mtu::from_ibv(attr.active_mtu).ok_or_else(|| {
            self.ctx.verbs_error(
                "ibv_query_port",
                io::Error::from(io::ErrorKind::InvalidData),
                format!("unknown active MTU value {}", attr.active_mtu),
            )
        })?;
        let (gid_index, gid) = self.select_gid(port, &attr, link_layer, gid)?;
        Ok(EndpointInfo { device: self.ctx.name.clone(), port, gid, gid_index, lid: attr.lid, mtu, link_layer })
    }

    fn select_gid(&self, port: u8, attr: &sys::ibv_port_attr, link: LinkLayer, sel: GidSelector) -> Result<(u8, Gid)> {
        let index = match sel {
            GidSelector::Index(i) => i,
            GidSelector::Auto if link != LinkLayer::Ethernet => 0,
            GidSelector::Auto => {
                let mut best: Option<(u8, u8)> = None; // (rank, index)
                for i in 0..attr.gid_tbl_len.clamp(0, 256) as u32 {
                    let Some(entry) = self.ctx.query_gid(port, i)? else { continue };
                    let kind = match entry.gid_type {
                        sys::IBV_GID_TYPE_ROCE_V2 => GidKind::RoceV2,
                        sys::IBV_GID_TYPE_ROCE_V1 => GidKind::RoceV1,
                        _ => GidKind::Ib,
                    };
                    // SAFETY: every bit pattern of the union is a valid byte array.
                    let gid = Gid(unsafe { entry.gid.raw });
                    if let Some(rank) = roce_gid_rank(&gid, kind) {
                        if best.is_none_or(|(r, _)| rank > r) {
                            best = Some((rank, i as u8));
                        }
                    }
                }
                best.map(|(_, i)| i).ok_or_else(|| {
                    self.ctx.verbs_error(
                        "selecting a GID",
                        io::Error::from(io::ErrorKind::NotFound),
                        format!("port {port} has no usable RoCE GID; give the netdev an IP address"),
                    )
                })?
            }
        };
        let entry = self.ctx.query_gid(port, index as u32)?.ok_or_else(|| {
            self.ctx.verbs_error(
                "ibv_query_gid_ex",
                io::Error::from_raw_os_error(ENODATA),
                format!("GID index {index} of port {port} is empty"),
            )
        })?;
        // SAFETY: as above.
        Ok((index, Gid(unsafe { entry.gid.raw })))
    }
}
