//! Domain types shared by the coordinator, the worker agent and flamingoctl,
//! their conversions to and from `flamingo.v1`, and small helpers (state
//! directories, ports, clocks, tracing set-up).

pub mod bandwidth;
pub mod convert;
pub mod error;
pub mod ids;
pub mod jobs;
pub mod net;
pub mod nodes;
pub mod paths;
pub mod telemetry;

pub use error::CommonError;
pub use ids::{JobId, NodeId};
pub use jobs::{JobEvent, JobKind, JobRecord, JobSpec, JobState, RankRecord, RankState};
pub use nodes::NodeRecord;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}
