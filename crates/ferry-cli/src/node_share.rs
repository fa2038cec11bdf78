//! Which share of a dataset a deployed node holds: the flags `ferry client` takes to split a
//! dataset like `ferry simulate` does, and `ferry evaluate` takes to score a model on the same
//! node's held-out share.

use anyhow::Result;
use ferry_ml::data::partition::Partitioner;

/// A node's share of a dataset, split like `ferry simulate` splits it.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeShare {
    /// Take one share of the dataset, split like `ferry simulate` does: iid, dirichlet:B, ...
    #[arg(long, default_value = "iid")]
    pub partition: String,
    /// Number of shares the dataset is split into.
    #[arg(long, default_value_t = 10)]
    pub num_partitions: usize,
    /// This node's share, from 0; without it the node holds the whole split.
    #[arg(long)]
    pub partition_index: Option<usize>,
    /// Seed of the split (the same on every node).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl NodeShare {
    /// The indices of the examples (of a split with these `labels`) the node holds, with the
    /// pixel noise its share carries.
    pub fn indices(&self, labels: &[u8]) -> Result<(Vec<usize>, f32)> {
        Ok(match self.partition_index {
            Some(index) => {
                anyhow::ensure!(
                    index < self.num_partitions,
                    "--partition-index {index} must be below --num-partitions {}",
                    self.num_partitions
                );
                let partitioner: Partitioner = self.partition.parse()?;
                let mut split = partitioner.split(labels, self.num_partitions, self.seed)?;
                (split.parts.swap_remove(index), split.noise_std[index])
            }
            None => ((0..labels.len()).collect(), 0.0),
        })
    }
}
