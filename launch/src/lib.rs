//! Everything that starts or supervises flamingo's processes for a
//! scheduler: a local cluster on one machine ([`local`], [`cluster`]:
//! `flamingoctl up` and `down`), Slurm ([`slurm`]: the sbatch script, and
//! inside the allocation the supervisor of etcd, the coordinator, the data
//! service and the agents), and Kubernetes ([`k8s`]: the objects, applied
//! through the API server). The agent's own rank spawning is
//! `flamingo_common::ranks`.

pub mod cluster;
pub mod error;
pub mod k8s;
pub mod local;
pub mod pki;
pub mod slurm;

pub use error::{LaunchError, Result};
