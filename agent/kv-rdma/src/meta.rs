//! Metadata the two engines exchange (registry value, connection handshake), as JSON.
//!
//! Two messages, both versioned:
//! - [`KvRdmaAdvert`]: what a prefill engine publishes once (registry `transfer.rdma`):
//!   its RDMA endpoint, the memory layout of its KV cache and one [`RemoteRegion`] (address,
//!   rkey, length) per registered region. A decode engine plans READs from it.
//! - [`ConnectInfo`]: one side's endpoint and queue pairs ([`QpInfo`]: number, initial
//!   PSN, READ depth), sent by each side when a decode engine connects to a prefill engine.
//!
//! Parsing checks the version first, then every field a peer could get wrong (GID length,
//! 24-bit QP numbers and PSNs, MTU values, region bounds, the layout).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::MetaError;
use crate::layout::KvMemoryLayout;

/// Version of the JSON messages in this module. A reader refuses other versions: the
/// fields are used to address remote memory, so guessing is not an option.
pub const META_VERSION: u32 = 1;

/// Most queue pairs one connection may ask for.
pub const MAX_QPS_PER_CONNECTION: usize = 64;

/// Default outstanding RDMA READs per QP (as initiator and as responder); most HCAs allow 16.
pub const DEFAULT_RD_ATOMIC: u8 = 16;

/// A 128-bit port GID, as raw bytes in network order. JSON: 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Result<Self, MetaError> {
        if s.len() != 32 {
            return Err(MetaError::invalid("gid", format!("expected 32 hex digits, got {} characters", s.len())));
        }
        let mut raw = [0u8; 16];
        for (i, byte) in raw.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).filter(|p| p.bytes().all(|c| c.is_ascii_hexdigit()));
            *byte = pair
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| MetaError::invalid("gid", format!("{s:?} is not hexadecimal")))?;
        }
        Ok(Self(raw))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// `::ffff:a.b.c.d`: the RoCE v2 GID of an IPv4 address (routable, what RoCE fabrics use).
    pub fn is_ipv4_mapped(&self) -> bool {
        self.0[..10] == [0; 10] && self.0[10..12] == [0xff, 0xff]
    }

    /// `fe80::/10`.
    pub fn is_link_local(&self) -> bool {
        self.0[0] == 0xfe && self.0[1] & 0xc0 == 0x80
    }
}

impl std::fmt::Debug for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gid({})", self.to_hex())
    }
}

impl std::fmt::Display for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Gid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Gid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Gid::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Path MTU. JSON: the size in bytes (256, 512, 1024, 2048 or 4096).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub enum Mtu {
    Mtu256,
    Mtu512,
    Mtu1024,
    Mtu2048,
    Mtu4096,
}

impl Mtu {
    pub fn bytes(self) -> u32 {
        match self {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    /// The `enum ibv_mtu` value (IBV_MTU_256 = 1 ... IBV_MTU_4096 = 5).
    pub fn to_ibv(self) -> u32 {
        self as u32 + 1
    }

    pub fn from_ibv(v: u32) -> Option<Self> {
        [Mtu::Mtu256, Mtu::Mtu512, Mtu::Mtu1024, Mtu::Mtu2048, Mtu::Mtu4096].get((v as usize).checked_sub(1)?).copied()
    }
}

impl TryFrom<u32> for Mtu {
    type Error = String;
    fn try_from(bytes: u32) -> Result<Self, String> {
        match bytes {
            256 => Ok(Mtu::Mtu256),
            512 => Ok(Mtu::Mtu512),
            1024 => Ok(Mtu::Mtu1024),
            2048 => Ok(Mtu::Mtu2048),
            4096 => Ok(Mtu::Mtu4096),
            other => Err(format!("MTU {other} is not one of 256, 512, 1024, 2048, 4096")),
        }
    }
}

impl From<Mtu> for u32 {
    fn from(m: Mtu) -> u32 {
        m.bytes()
    }
}

/// Link layer of a port: InfiniBand (LID routing, GRH optional) or Ethernet (RoCE: GID
/// routing, no LID). Both ends of a queue pair must be on the same kind of fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkLayer {
    Infiniband,
    Ethernet,
    #[default]
    Unspecified,
}

/// One side's RDMA port: enough for a peer to address its queue pairs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Device name as libibverbs reports it (`mlx5_0`, `rxe0`), for logs and errors.
    pub device: String,
    /// Port number, from 1.
    pub port: u8,
    /// The port GID this side uses as source GID.
    pub gid: Gid,
    /// Index of `gid` in this side's GID table (informational for the peer).
    #[serde(default)]
    pub gid_index: u8,
    /// Port LID (InfiniBand); 0 on RoCE.
    #[serde(default)]
    pub lid: u16,
    /// Active MTU of the port; a connection uses the smaller of the two.
    pub mtu: Mtu,
    #[serde(default)]
    pub link_layer: LinkLayer,
}

impl EndpointInfo {
    pub fn validate(&self) -> Result<(), MetaError> {
        if self.device.is_empty() {
            return Err(MetaError::invalid("endpoint.device", "empty"));
        }
        if self.port == 0 {
            return Err(MetaError::invalid("endpoint.port", "ports are numbered from 1"));
        }
        match self.link_layer {
            LinkLayer::Ethernet if self.gid.is_zero() => {
                Err(MetaError::invalid("endpoint.gid", "RoCE (ethernet) endpoints need a non-zero GID"))
            }
            _ if self.gid.is_zero() && self.lid == 0 => {
                Err(MetaError::invalid("endpoint", "neither a LID nor a GID to address the port by"))
            }
            _ => Ok(()),
        }
    }
}

/// One queue pair of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QpInfo {
    /// QP number (24 bits).
    pub qp_num: u32,
    /// Initial packet sequence number (24 bits): the peer's receive PSN.
    pub psn: u32,
    /// RDMA READs this QP accepts in flight as responder (`max_dest_rd_atomic`).
    #[serde(default = "default_rd_atomic")]
    pub responder_resources: u8,
    /// RDMA READs this QP keeps in flight as requester (`max_rd_atomic`).
    #[serde(default = "default_rd_atomic")]
    pub initiator_depth: u8,
}

fn default_rd_atomic() -> u8 {
    DEFAULT_RD_ATOMIC
}

impl QpInfo {
    pub fn validate(&self) -> Result<(), MetaError> {
        // QP 0 and 1 are the subnet management QPs; never an RC QP.
        if self.qp_num <= 1 || self.qp_num >= 1 << 24 {
            return Err(MetaError::invalid("qp.qp_num", format!("{} is not a 24-bit RC QP number", self.qp_num)));
        }
        if self.psn >= 1 << 24 {
            return Err(MetaError::invalid("qp.psn", format!("{} does not fit in 24 bits", self.psn)));
        }
        if self.responder_resources == 0 || self.initiator_depth == 0 {
            return Err(MetaError::invalid("qp", "responder_resources and initiator_depth must be at least 1"));
        }
        Ok(())
    }
}

/// A registered memory region as a peer addresses it with RDMA READ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteRegion {
    /// Virtual address (or IOVA for dma-buf regions) of the region's first byte.
    pub addr: u64,
    pub rkey: u32,
    /// Bytes.
    pub len: u64,
}

impl RemoteRegion {
    pub fn validate(&self) -> Result<(), MetaError> {
        if self.len == 0 {
            return Err(MetaError::invalid("region.len", "0"));
        }
        if self.addr.checked_add(self.len).is_none() {
            return Err(MetaError::invalid("region", format!("{:#x} + {} overflows", self.addr, self.len)));
        }
        Ok(())
    }
}

/// What a prefill engine publishes so decode engines can read its KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRdmaAdvert {
    pub version: u32,
    pub endpoint: EndpointInfo,
    pub layout: KvMemoryLayout,
    /// Indexed by the layout's region numbers.
    pub regions: Vec<RemoteRegion>,
    /// The per-layer progress marks (a little-endian u32 per layer, in layer order) the
    /// source's forward writes once a layer's KV is written, where it publishes them: a
    /// reader READs them to read each layer as soon as it is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<RemoteRegion>,
}

impl KvRdmaAdvert {
    pub fn new(endpoint: EndpointInfo, layout: KvMemoryLayout, regions: Vec<RemoteRegion>) -> Self {
        Self { version: META_VERSION, endpoint, layout, regions, progress: None }
    }

    /// The same, with progress marks at `progress`.
    pub fn with_progress(self, progress: Option<RemoteRegion>) -> Self {
        Self { progress, ..self }
    }

    pub fn validate(&self) -> Result<(), MetaError> {
        check_version("KvRdmaAdvert", self.version as u64)?;
        self.endpoint.validate()?;
        for r in &self.regions {
            r.validate()?;
        }
        if let Some(marks) = &self.progress {
            marks.validate()?;
            if marks.len < self.layout.shape.layers as u64 * 4 {
                return Err(MetaError::invalid("progress.len", format!("{} bytes for {} layers' marks", marks.len, self.layout.shape.layers)));
            }
        }
        self.layout.validate()?;
        let lens: Vec<u64> = self.regions.iter().map(|r| r.len).collect();
        self.layout.check_regions(&lens)?;
        Ok(())
    }

    pub fn to_json(&self) -> String {
        to_json(self)
    }

    /// Parses and validates; the version is checked before anything else.
    pub fn from_json(s: &str) -> Result<Self, MetaError> {
        let advert: Self = from_json("KvRdmaAdvert", s)?;
        advert.validate()?;
        Ok(advert)
    }
}

/// One side of a connection handshake: its endpoint and one entry per queue pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectInfo {
    pub version: u32,
    pub endpoint: EndpointInfo,
    pub qps: Vec<QpInfo>,
}

impl ConnectInfo {
    pub fn new(endpoint: EndpointInfo, qps: Vec<QpInfo>) -> Self {
        Self { version: META_VERSION, endpoint, qps }
    }

    pub fn validate(&self) -> Result<(), MetaError> {
        check_version("ConnectInfo", self.version as u64)?;
        self.endpoint.validate()?;
        if self.qps.is_empty() || self.qps.len() > MAX_QPS_PER_CONNECTION {
            return Err(MetaError::invalid(
                "qps",
                format!("{} queue pairs; expected 1 to {MAX_QPS_PER_CONNECTION}", self.qps.len()),
            ));
        }
        for qp in &self.qps {
            qp.validate()?;
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        to_json(self)
    }

    pub fn from_json(s: &str) -> Result<Self, MetaError> {
        let info: Self = from_json("ConnectInfo", s)?;
        info.validate()?;
        Ok(info)
    }
}

fn check_version(what: &'static str, found: u64) -> Result<(), MetaError> {
    if found != META_VERSION as u64 {
        return Err(MetaError::UnsupportedVersion { what, found, supported: META_VERSION });
    }
    Ok(())
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Plain structs of numbers and strings: serialization cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// Reads the version before the body so a message from a newer peer is reported as
/// such instead of as whatever field happened to change.
fn from_json<T: serde::de::DeserializeOwned>(what: &'static str, s: &str) -> Result<T, MetaError> {
    let value: serde_json::Value = serde_json::from_str(s).map_err(|source| MetaError::Json { what, source })?;
    let version = value.get("version").and_then(|v| v.as_u64()).ok_or(MetaError::MissingVersion { what })?;
    check_version(what, version)?;
    serde_json::from_value(value).map_err(|source| MetaError::Json { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::KvShape;

    fn endpoint() -> EndpointInfo {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 1, 2, 3]);
        EndpointInfo {
            device: "mlx5_0".into(),
            port: 1,
            gid: Gid(gid),
            gid_index: 3,
            lid: 0,
            mtu: Mtu::Mtu4096,
            link_layer: LinkLayer::Ethernet,
        }
    }

    fn advert() -> KvRdmaAdvert {
        let shape = KvShape { layers: 2, kv_heads: 8, head_dim: 128, block_size: 16, elem_bytes: 2 };
        let layout = KvMemoryLayout::separate_regions(shape, 100);
        let regions = (0..4)
            .map(|i| RemoteRegion { addr: 0x7f00_0000_0000 + i * 0x1000_0000, rkey: 0x1234 + i as u32, len: 3_276_800 })
            .collect();
        KvRdmaAdvert::new(endpoint(), layout, regions)
    }

    fn connect() -> ConnectInfo {
        ConnectInfo::new(
            endpoint(),
            vec![
                QpInfo { qp_num: 0x1a2b, psn: 0xabcdef, responder_resources: 16, initiator_depth: 8 },
                QpInfo { qp_num: 0xffffff, psn: 0, responder_resources: 1, initiator_depth: 1 },
            ],
        )
    }

    #[test]
    fn gid_hex_round_trip_and_classes() {
        let g = endpoint().gid;
        assert_eq!(g.to_hex(), "00000000000000000000ffff0a010203");
        assert_eq!(Gid::from_hex(&g.to_hex()).unwrap(), g);
        assert_eq!(Gid::from_hex("00000000000000000000FFFF0A010203").unwrap(), g);
        assert!(g.is_ipv4_mapped() && !g.is_link_local() && !g.is_zero());
        let ll = Gid::from_hex("fe800000000000000202c9fffe000001").unwrap();
        assert!(ll.is_link_local() && !ll.is_ipv4_mapped());
    }

    #[test]
    fn gid_rejects_bad_hex() {
        for bad in [
            "",
            "00",
            &"0".repeat(31),
            &"0".repeat(33),
            &format!("{}zz", "0".repeat(30)),
            &format!("{}é", "0".repeat(30)),
        ] {
            assert!(Gid::from_hex(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mtu_maps_bytes_and_ibv_values() {
        for (m, bytes, ibv) in [(Mtu::Mtu256, 256, 1), (Mtu::Mtu1024, 1024, 3), (Mtu::Mtu4096, 4096, 5)] {
            assert_eq!(m.bytes(), bytes);
            assert_eq!(m.to_ibv(), ibv);
            assert_eq!(Mtu::from_ibv(ibv), Some(m));
            assert_eq!(Mtu::try_from(bytes), Ok(m));
        }
        assert_eq!(Mtu::from_ibv(0), None);
        assert_eq!(Mtu::from_ibv(6), None);
        assert!(Mtu::try_from(1500).is_err());
    }

    #[test]
    fn advert_round_trips() {
        let a = advert();
        let json = a.to_json();
        let back = KvRdmaAdvert::from_json(&json).unwrap();
        assert_eq!(back, a);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["endpoint"]["gid"], "00000000000000000000ffff0a010203");
        assert_eq!(v["endpoint"]["mtu"], 4096);
        assert_eq!(v["endpoint"]["link_layer"], "ethernet");
        assert_eq!(v["regions"][1]["rkey"], 0x1235);
        assert!(v.get("progress").is_none(), "no marks, no field: older readers see what they know");
        let marked = advert().with_progress(Some(RemoteRegion { addr: 0x9000, rkey: 0x77, len: 8 }));
        assert_eq!(KvRdmaAdvert::from_json(&marked.to_json()).unwrap(), marked);
    }

    #[test]
    fn connect_info_round_trips() {
        let c = connect();
        assert_eq!(ConnectInfo::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn optional_fields_take_defaults_and_unknown_fields_are_ignored() {
        let json = r#"{"version":1,"future":true,"endpoint":{"device":"mlx5_1","port":1,
            "gid":"fe800000000000000202c9fffe000001","mtu":2048,"lid":7},
            "qps":[{"qp_num":77,"psn":5}]}"#;
        let c = ConnectInfo::from_json(json).unwrap();
        assert_eq!(c.endpoint.link_layer, LinkLayer::Unspecified);
        assert_eq!(c.endpoint.gid_index, 0);
        assert_eq!(c.qps[0].responder_resources, DEFAULT_RD_ATOMIC);
        assert_eq!(c.qps[0].initiator_depth, DEFAULT_RD_ATOMIC);
    }

    fn mutate(f: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&connect().to_json()).unwrap();
        f(&mut v);
        v.to_string()
    }

    #[test]
    fn connect_info_rejects_malformed_input() {
        let cases: Vec<(&str, String)> = vec![
            ("not json", "{".into()),
            ("no version", mutate(|v| drop(v.as_object_mut().unwrap().remove("version")))),
            ("string version", mutate(|v| v["version"] = "1".into())),
            ("newer version", mutate(|v| v["version"] = 2.into())),
            ("short gid", mutate(|v| v["endpoint"]["gid"] = "ffff".into())),
            ("gid not hex", mutate(|v| v["endpoint"]["gid"] = "x".repeat(32).into())),
            ("gid as bytes", mutate(|v| v["endpoint"]["gid"] = serde_json::Value::from(vec![0; 16]))),
            ("mtu 1500", mutate(|v| v["endpoint"]["mtu"] = 1500.into())),
            ("port 0", mutate(|v| v["endpoint"]["port"] = 0.into())),
            ("port 300", mutate(|v| v["endpoint"]["port"] = 300.into())),
            ("empty device", mutate(|v| v["endpoint"]["device"] = "".into())),
            ("zero roce gid", mutate(|v| v["endpoint"]["gid"] = "0".repeat(32).into())),
            ("unknown link layer", mutate(|v| v["endpoint"]["link_layer"] = "omnipath".into())),
            ("qp_num 25 bits", mutate(|v| v["qps"][0]["qp_num"] = (1u32 << 24).into())),
            ("qp_num 1", mutate(|v| v["qps"][0]["qp_num"] = 1.into())),
            ("psn 25 bits", mutate(|v| v["qps"][0]["psn"] = (1u32 << 24).into())),
            ("negative psn", mutate(|v| v["qps"][0]["psn"] = (-1).into())),
            ("zero depth", mutate(|v| v["qps"][0]["initiator_depth"] = 0.into())),
            ("no qps", mutate(|v| v["qps"] = serde_json::json!([]))),
            ("too many qps", mutate(|v| v["qps"] = serde_json::Value::from(vec![v["qps"][0].clone(); 65]))),
            ("missing qp field", mutate(|v| drop(v["qps"][0].as_object_mut().unwrap().remove("psn")))),
        ];
        for (name, json) in cases {
            assert!(ConnectInfo::from_json(&json).is_err(), "{name} was accepted: {json}");
        }
    }

    #[test]
    fn version_is_reported_before_other_problems() {
        let json = r#"{"version":7,"endpoint":"whatever"}"#;
        let err = ConnectInfo::from_json(json).unwrap_err();
        assert!(matches!(err, MetaError::UnsupportedVersion { found: 7, supported: 1, .. }), "{err}");
    }

    fn mutate_advert(f: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&advert().to_json()).unwrap();
        f(&mut v);
        v.to_string()
    }

    #[test]
    fn advert_rejects_malformed_input() {
        let cases: Vec<(&str, String)> = vec![
            ("region len 0", mutate_advert(|v| v["regions"][0]["len"] = 0.into())),
            ("region wraps", mutate_advert(|v| v["regions"][0]["addr"] = u64::MAX.into())),
            ("region too small", mutate_advert(|v| v["regions"][2]["len"] = 100.into())),
            ("region missing", mutate_advert(|v| drop(v["regions"].as_array_mut().unwrap().pop()))),
            ("rkey too wide", mutate_advert(|v| v["regions"][0]["rkey"] = (1u64 << 32).into())),
            ("layout layer missing", mutate_advert(|v| drop(v["layout"]["layers"].as_array_mut().unwrap().pop()))),
            ("stride too small", mutate_advert(|v| v["layout"]["block_stride"] = 1.into())),
            ("zero heads", mutate_advert(|v| v["layout"]["shape"]["kv_heads"] = 0.into())),
            ("version 0", mutate_advert(|v| v["version"] = 0.into())),
            ("marks short of a layer", mutate_advert(|v| v["progress"] = serde_json::json!({"addr": 4096, "rkey": 1, "len": 4}))),
            ("marks wrap", mutate_advert(|v| v["progress"] = serde_json::json!({"addr": u64::MAX, "rkey": 1, "len": 8}))),
            (
                "ib without lid or gid",
                mutate_advert(|v| {
                    v["endpoint"]["link_layer"] = "infiniband".into();
                    v["endpoint"]["gid"] = "0".repeat(32).into();
                }),
            ),
        ];
        for (name, json) in cases {
            assert!(KvRdmaAdvert::from_json(&json).is_err(), "{name} was accepted: {json}");
        }
    }
}
