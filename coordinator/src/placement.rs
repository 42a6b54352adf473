//! Gang placement: a job needing `nodes × slots_per_node` gets all its ranks
//! at once or none. Pure: no I/O, property-tested.
//!
//! Invariant: a placement names `nodes` distinct schedulable nodes, each with
//! at least `slots_per_node` free slots; `None` exactly when fewer than
//! `nodes` such nodes exist. Among candidates the fullest node that still
//! fits is chosen first (best fit, ties by node id), which keeps whole nodes
//! free for later large jobs and makes the result deterministic.

use flamingo_common::NodeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub node_id: NodeId,
    pub free_slots: u32,
    pub schedulable: bool,
}

/// Nodes for the job in node-rank order, or `None` if it must wait.
pub fn place(capacity: &[NodeCapacity], nodes: u32, slots_per_node: u32) -> Option<Vec<NodeId>> {
    let mut candidates: Vec<&NodeCapacity> = capacity
        .iter()
        .filter(|node| node.schedulable && node.free_slots >= slots_per_node)
        .collect();
    if candidates.len() < nodes as usize {
        return None;
    }
    candidates.sort_by(|left, right| {
        left.free_slots
            .cmp(&right.free_slots)
            .then_with(|| left.node_id.cmp(&right.node_id))
    });
    let mut chosen: Vec<NodeId> = candidates
        .into_iter()
        .take(nodes as usize)
        .map(|node| node.node_id.clone())
        .collect();
    // Node ranks follow node ids so rank numbering is stable and readable.
    chosen.sort();
    Some(chosen)
}

/// Global rank of `local_rank` on the `node_rank`-th node (node-major, as
/// torchrun numbers ranks).
pub fn global_rank(node_rank: u32, slots_per_node: u32, local_rank: u32) -> u32 {
    node_rank * slots_per_node + local_rank
}

/// The first port of `[first, first + count)` not in `taken`.
pub fn pick_port(first: u16, count: u16, taken: &[u16]) -> Option<u16> {
    (0..count)
        .map(|offset| first.saturating_add(offset))
        .find(|port| !taken.contains(port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn capacity_strategy() -> impl Strategy<Value = Vec<NodeCapacity>> {
        prop::collection::vec((0u32..9, any::<bool>()), 0..12).prop_map(|nodes| {
            nodes
                .into_iter()
                .enumerate()
                .map(|(index, (free_slots, schedulable))| NodeCapacity {
                    node_id: NodeId(format!("node-{index:02}")),
                    free_slots,
                    schedulable,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn placement_is_gang_and_respects_capacity(
            capacity in capacity_strategy(),
            nodes in 1u32..6,
            slots in 1u32..5,
        ) {
            let eligible = capacity
                .iter()
                .filter(|node| node.schedulable && node.free_slots >= slots)
                .count();
            match place(&capacity, nodes, slots) {
                None => prop_assert!(eligible < nodes as usize),
                Some(chosen) => {
                    prop_assert_eq!(chosen.len(), nodes as usize);
                    let distinct: BTreeSet<_> = chosen.iter().collect();
                    prop_assert_eq!(distinct.len(), chosen.len());
                    for node_id in &chosen {
                        let node = capacity.iter().find(|node| &node.node_id == node_id).expect("known node");
                        prop_assert!(node.schedulable);
                        prop_assert!(node.free_slots >= slots);
                    }
                    // Deterministic.
                    prop_assert_eq!(Some(chosen), place(&capacity, nodes, slots));
                }
            }
        }

        #[test]
        fn ranks_are_node_major_and_dense(nodes in 1u32..8, slots in 1u32..8) {
            let mut seen = BTreeSet::new();
            for node_rank in 0..nodes {
                for local_rank in 0..slots {
                    let rank = global_rank(node_rank, slots, local_rank);
                    prop_assert!(rank / slots == node_rank);
                    prop_assert!(seen.insert(rank));
                }
            }
            prop_assert_eq!(seen.len() as u32, nodes * slots);
            prop_assert_eq!(seen.iter().max().copied(), Some(nodes * slots - 1));
        }
    }

    #[test]
    fn best_fit_keeps_whole_nodes_free() {
        let capacity = vec![
            NodeCapacity {
                node_id: NodeId("a".into()),
                free_slots: 8,
                schedulable: true,
            },
            NodeCapacity {
                node_id: NodeId("b".into()),
                free_slots: 2,
                schedulable: true,
            },
            NodeCapacity {
                node_id: NodeId("c".into()),
                free_slots: 1,
                schedulable: true,
            },
            NodeCapacity {
                node_id: NodeId("d".into()),
                free_slots: 4,
                schedulable: false,
            },
        ];
        assert_eq!(place(&capacity, 1, 2), Some(vec![NodeId("b".into())]));
        assert_eq!(
            place(&capacity, 2, 2),
            Some(vec![NodeId("a".into()), NodeId("b".into())])
        );
        assert_eq!(place(&capacity, 3, 2), None);
    }

    #[test]
    fn port_picking_skips_taken_ports() {
        assert_eq!(pick_port(29500, 3, &[29500, 29501]), Some(29502));
        assert_eq!(pick_port(29500, 2, &[29500, 29501]), None);
    }
}
