//! The collective-check report: correctness verdict and a bandwidth sweep in
//! the shape of nccl-tests (`size`, `count`, `type`, `time`, `algbw`,
//! `busbw`), shared by the rank that measures it and flamingoctl that prints it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BandwidthRow {
    /// `all_reduce`, `all_gather` or `reduce_scatter`.
    pub op: String,
    /// Bytes of the full buffer (nccl-tests' `size`: the all-gather output,
    /// the reduce-scatter input).
    pub bytes: u64,
    pub count: u64,
    pub dtype: String,
    /// Mean time per operation, slowest rank.
    pub time_us: f64,
    /// bytes / time, in GB/s (10^9).
    pub algbw_gbps: f64,
    /// algbw × the op's bus factor: 2(n-1)/n for all-reduce, (n-1)/n for the others.
    pub busbw_gbps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectiveCheckReport {
    pub backend: String,
    pub world_size: u32,
    pub checks_passed: Vec<String>,
    pub rows: Vec<BandwidthRow>,
}

/// nccl-tests' bus bandwidth factor for `op` on `world_size` ranks.
pub fn bus_factor(op: &str, world_size: u32) -> f64 {
    let ranks = f64::from(world_size.max(1));
    match op {
        "all_reduce" => 2.0 * (ranks - 1.0) / ranks,
        _ => (ranks - 1.0) / ranks,
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The sweep as a fixed-width table, one block per operation.
pub fn render_table(report: &CollectiveCheckReport) -> String {
    let mut out = format!(
        "collective-check: backend {}, {} ranks; checks passed: {}\n",
        report.backend,
        report.world_size,
        report.checks_passed.join(", ")
    );
    let mut current_op = "";
    for row in &report.rows {
        if row.op != current_op {
            current_op = &row.op;
            out.push_str(&format!(
                "\n# {}\n{:>10} {:>12} {:>6} {:>12} {:>10} {:>10}\n",
                row.op, "size", "count", "type", "time (us)", "algbw GB/s", "busbw GB/s"
            ));
        }
        out.push_str(&format!(
            "{:>10} {:>12} {:>6} {:>12.1} {:>10.3} {:>10.3}\n",
            human_bytes(row.bytes),
            row.count,
            row.dtype,
            row.time_us,
            row.algbw_gbps,
            row.busbw_gbps
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_factors_match_nccl_tests() {
        assert!((bus_factor("all_reduce", 4) - 1.5).abs() < 1e-12);
        assert!((bus_factor("all_gather", 4) - 0.75).abs() < 1e-12);
        assert!((bus_factor("reduce_scatter", 2) - 0.5).abs() < 1e-12);
        assert_eq!(bus_factor("all_reduce", 1), 0.0);
    }

    #[test]
    fn table_lists_every_row() {
        let report = CollectiveCheckReport {
            backend: "gloo".into(),
            world_size: 4,
            checks_passed: vec!["all_reduce".into()],
            rows: vec![BandwidthRow {
                op: "all_reduce".into(),
                bytes: 1 << 20,
                count: 1 << 18,
                dtype: "float".into(),
                time_us: 100.0,
                algbw_gbps: 10.486,
                busbw_gbps: 15.729,
            }],
        };
        let table = render_table(&report);
        assert!(table.contains("1 MiB"), "{table}");
        assert!(table.contains("15.729"), "{table}");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
