//! The masking graph: which pairs of nodes share a pairwise mask and hold each other's
//! secret shares.
//!
//! SecAgg+ (Bell et al., 2020) replaces SecAgg's complete graph with a sparse one so that
//! each node's work grows with its neighbourhood, not with the round. Here the participants
//! are placed on a ring in an order drawn from the round's public seed, and each is joined to
//! the `k / 2` nearest on either side (a Harary graph under a random relabelling).

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// Participant ids are the positions in the round's roster.
pub type ParticipantId = u32;

/// The neighbour lists of every participant of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourGraph {
    neighbours: Vec<Vec<ParticipantId>>,
}

impl NeighbourGraph {
    /// The graph over `participants` nodes with `neighbourhood` neighbours each (see
    /// [`crate::SecAggParams::neighbourhood`]), placed on the ring by `seed`.
    pub fn new(participants: usize, neighbourhood: usize, seed: [u8; 32]) -> Self {
        let mut order: Vec<ParticipantId> = (0..participants as ParticipantId).collect();
        let mut rng = ChaCha20Rng::from_seed(seed);
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut neighbours = vec![Vec::new(); participants];
        if neighbourhood + 1 >= participants {
            for (id, list) in neighbours.iter_mut().enumerate() {
                list.extend((0..participants as ParticipantId).filter(|&v| v as usize != id));
            }
        } else {
            let half = neighbourhood / 2;
            for (position, &id) in order.iter().enumerate() {
                let list = &mut neighbours[id as usize];
                for step in 1..=half {
                    list.push(order[(position + step) % participants]);
                    list.push(order[(position + participants - step) % participants]);
                }
                list.sort_unstable();
            }
        }
        Self { neighbours }
    }

    /// `id`'s neighbours in ascending order; empty for an unknown id.
    pub fn neighbours(&self, id: ParticipantId) -> &[ParticipantId] {
        self.neighbours.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Where `holder` sits in `owner`'s neighbour list: the Shamir share index of `owner`'s
    /// secrets that `holder` received.
    pub fn share_index(&self, owner: ParticipantId, holder: ParticipantId) -> Option<usize> {
        self.neighbours(owner).binary_search(&holder).ok()
    }

    /// Number of participants.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    /// Whether the round has no participants.
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_is_symmetric_and_regular() {
        let graph = NeighbourGraph::new(50, 8, [7; 32]);
        for u in 0..50 {
            let list = graph.neighbours(u);
            assert_eq!(list.len(), 8);
            assert!(!list.contains(&u));
            for &v in list {
                assert!(graph.neighbours(v).contains(&u), "{u} -> {v} not mutual");
            }
        }
    }

    #[test]
    fn a_wide_neighbourhood_is_the_complete_graph() {
        let graph = NeighbourGraph::new(5, 4, [1; 32]);
        assert_eq!(graph.neighbours(2), &[0, 1, 3, 4]);
    }

    #[test]
    fn the_seed_changes_who_neighbours_whom() {
        let a = NeighbourGraph::new(40, 4, [1; 32]);
        let b = NeighbourGraph::new(40, 4, [2; 32]);
        assert_ne!(a, b);
        assert_eq!(a, NeighbourGraph::new(40, 4, [1; 32]));
    }
}
