//! Worker nodes as registered with the coordinator (stored under an etcd lease).

use serde::{Deserialize, Serialize};

use crate::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: NodeId,
    /// Address other nodes reach this one at (becomes MASTER_ADDR).
    pub address: String,
    pub slots: u32,
    pub gpu: bool,
    pub draining: bool,
    pub agent_endpoint: String,
    pub rendezvous_port_first: u16,
    pub rendezvous_port_count: u16,
    /// The etcd lease that keeps this record alive.
    pub lease_id: i64,
    pub registered_unix_ms: i64,
}
