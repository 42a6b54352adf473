//! Domain types shared by the coordinator, the worker agent and flamingoctl,
//! their conversions to and from `flamingo.v1`, and small helpers (state
//! directories, ports, clocks, tracing set-up).

pub mod bandwidth;
pub mod brace;
pub mod convert;
pub mod error;
pub mod ids;
pub mod jobs;
pub mod net;
pub mod nodes;
pub mod objects;
pub mod paths;
pub mod progress;
pub mod prometheus;
pub mod ranks;
pub mod rng;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod train;

pub use error::CommonError;
pub use ids::{JobId, NodeId};
pub use jobs::{
    CheckpointRecord, EventKind, JobEvent, JobKind, JobPolicy, JobRecord, JobSpec, JobState,
    RankRecord, RankState,
};
pub use nodes::NodeRecord;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, with the fraction.
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// `unix_ms` as a UTC time of day, `HH:MM:SS`, for one-line logs.
pub fn format_unix_ms(unix_ms: i64) -> String {
    let seconds = unix_ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}
