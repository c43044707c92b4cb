//! Test support (feature `testing`): a real etcd process on free loopback ports.

mod etcd_server;

pub use etcd_server::EtcdServer;
