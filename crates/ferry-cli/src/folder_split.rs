//! `ferry simulate --trainer-cmd CMD --node-data DIR --clients N`: one folder of CSV files
//! split into N virtual nodes' folders, as `ferry simulate` splits a built-in dataset.
//! `train.csv` is split by the run's partitioner (its first column is the class label, which
//! the label-skew partitions need); every other CSV file (a `test.csv` of held-out rows) is
//! split IID, so each node also gets its own share of it; other files are copied to every node.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ferry_ml::data::partition::Partitioner;

/// A CSV file's rows, with its header line if it has one.
struct Rows {
    header: Option<String>,
    rows: Vec<String>,
}

impl Rows {
    /// Reads `path`; the first line is a header when its first field is not a number.
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty()).peekable();
        let header = lines
            .peek()
            .filter(|first| first_field(first).parse::<f64>().is_err())
            .map(|h| h.to_string());
        if header.is_some() {
            lines.next();
        }
        Ok(Self {
            header,
            rows: lines.map(String::from).collect(),
        })
    }

    /// Each row's class label (its first field), as the label-skew partitions need it.
    fn labels(&self, path: &Path, by_label: bool) -> Result<Vec<u8>> {
        self.rows
            .iter()
            .enumerate()
            .map(|(i, row)| match first_field(row).parse::<u8>() {
                Ok(label) => Ok(label),
                Err(_) if !by_label => Ok(0),
                Err(_) => bail!(
                    "{} line {}: the first column must be a class label from 0 to 255 to split \
                     by label; got '{}'. Split with --partition iid or quantity:B, or give one \
                     folder per node",
                    path.display(),
                    i + 1,
                    first_field(row)
                ),
            })
            .collect()
    }

    /// Writes the rows at `indices` (with the header) to `path`.
    fn write(&self, indices: &[usize], path: &Path) -> Result<()> {
        let mut text = String::new();
        for line in self
            .header
            .iter()
            .chain(indices.iter().map(|&i| &self.rows[i]))
        {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }
}

fn first_field(line: &str) -> &str {
    line.split(',').next().unwrap_or_default().trim()
}

/// Splits `folder` into `nodes` folders under `out` (`out/node-0`, ...), `train.csv` by
/// `partitioner` and the other CSV files IID, from `seed`; returns the node folders.
pub fn split(
    folder: &Path,
    nodes: usize,
    partitioner: &Partitioner,
    seed: u64,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    if matches!(partitioner, Partitioner::Noise(_)) {
        bail!(
            "--partition {partitioner} adds pixel noise inside Ferry's built-in trainer; a \
             folder of your own is split by rows: use iid, dirichlet:B, labels:C, classes:... \
             or quantity:B"
        );
    }
    let train = folder.join("train.csv");
    if !train.is_file() {
        bail!(
            "--node-data {} with --clients {nodes}: the folder is split into {nodes} nodes by \
             its train.csv, which it lacks; give one folder per node instead ('DIR/*')",
            folder.display()
        );
    }
    let folders: Vec<PathBuf> = (0..nodes).map(|i| out.join(format!("node-{i}"))).collect();
    for node in &folders {
        if node.exists() {
            std::fs::remove_dir_all(node)
                .with_context(|| format!("cannot clear {}", node.display()))?;
        }
        std::fs::create_dir_all(node)
            .with_context(|| format!("cannot create {}", node.display()))?;
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("cannot list {}", folder.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().context("a file has a name")?;
        if path.extension().is_none_or(|e| e != "csv") {
            for node in &folders {
                std::fs::copy(&path, node.join(name))
                    .with_context(|| format!("cannot copy {}", path.display()))?;
            }
            continue;
        }
        let rows = Rows::read(&path)?;
        let rule = if path == train {
            partitioner
        } else {
            &Partitioner::Iid
        };
        let by_label = !matches!(rule, Partitioner::Iid | Partitioner::Quantity(_));
        let labels = rows.labels(&path, by_label)?;
        let parts = rule
            .split(&labels, nodes, seed)
            .with_context(|| format!("cannot split {}", path.display()))?
            .parts;
        for (node, indices) in folders.iter().zip(&parts) {
            rows.write(indices, &node.join(name))?;
        }
    }
    Ok(folders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_csv_is_split_by_the_partitioner_and_other_files_follow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let site = dir.path().join("site");
        std::fs::create_dir_all(&site).expect("site");
        let train: String = std::iter::once("label,x\n".to_string())
            .chain((0..40).map(|i| format!("{},{i}\n", i % 4)))
            .collect();
        std::fs::write(site.join("train.csv"), train).expect("train");
        let test: String = (0..8).map(|i| format!("{},{i}\n", i % 4)).collect();
        std::fs::write(site.join("test.csv"), test).expect("test");
        std::fs::write(site.join("meta.json"), "{}").expect("meta");
        let classes: Partitioner = "classes:0+1/2+3".parse().expect("partitioner");
        let nodes = split(&site, 2, &classes, 7, &dir.path().join("nodes")).expect("split");
        assert_eq!(nodes.len(), 2);
        let read =
            |node: &Path, file: &str| std::fs::read_to_string(node.join(file)).expect("written");
        let first = read(&nodes[0], "train.csv");
        assert!(
            first.starts_with("label,x\n"),
            "the header is kept: {first}"
        );
        let labels: Vec<&str> = first.lines().skip(1).map(first_field).collect();
        assert_eq!(labels.len(), 20);
        assert!(labels.iter().all(|l| *l == "0" || *l == "1"), "{labels:?}");
        let tests: usize = nodes
            .iter()
            .map(|n| read(n, "test.csv").lines().count())
            .sum();
        assert_eq!(tests, 8, "every held-out row goes to exactly one node");
        assert_eq!(read(&nodes[1], "meta.json"), "{}");
    }

    #[test]
    fn what_cannot_be_split_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("nodes");
        let err = split(dir.path(), 2, &Partitioner::Iid, 0, &out).unwrap_err();
        assert!(err.to_string().contains("lacks"), "{err}");
        std::fs::write(
            dir.path().join("train.csv"),
            "animal,v\ncat,1\ndog,2\nemu,3\n",
        )
        .expect("train");
        let by_label: Partitioner = "labels:1".parse().expect("partitioner");
        let err = split(dir.path(), 2, &by_label, 0, &out).unwrap_err();
        assert!(format!("{err:#}").contains("'cat'"), "{err:#}");
        assert!(
            split(dir.path(), 2, &Partitioner::Iid, 0, &out).is_ok(),
            "iid needs no label"
        );
        let noise: Partitioner = "noise:0.1".parse().expect("partitioner");
        assert!(split(dir.path(), 2, &noise, 0, &out).is_err());
    }
}
