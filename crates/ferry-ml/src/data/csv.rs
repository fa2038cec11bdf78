//! A site's own images as CSV: `train.csv` (and, for evaluation, `test.csv`) with one example
//! per line — the class label, then the 784 pixels of a 28x28 grey image, either in `[0, 1]` or
//! as 0–255 values (a file whose values exceed 1 is read as 0–255).

use std::path::{Path, PathBuf};

use super::{Dataset, NUM_CLASSES, PIXELS, TrainTest, locate::DatasetFiles};
use crate::MlError;

const FILES: DatasetFiles = DatasetFiles {
    title: "CSV dataset",
    folder: "csv",
    required: &["train.csv"],
    hint: "put train.csv (label,pixel0,...,pixel783 per line) and optionally test.csv in --data-dir",
};

fn bad(path: &Path, reason: String) -> MlError {
    MlError::BadDataFile {
        path: path.to_path_buf(),
        reason,
    }
}

/// Reads one CSV file of labelled 28x28 images.
pub fn read(path: &Path) -> Result<Dataset, MlError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(path, e.to_string()))?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line_no = number + 1;
        let mut fields = line.split(',').map(str::trim);
        let label: u8 = fields
            .next()
            .and_then(|f| f.parse().ok())
            .filter(|&l| usize::from(l) < NUM_CLASSES)
            .ok_or_else(|| {
                bad(
                    path,
                    format!("line {line_no}: the first field must be a class label 0-9"),
                )
            })?;
        let start = images.len();
        for field in fields {
            let value: f32 = field
                .parse()
                .ok()
                .filter(|v: &f32| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    bad(
                        path,
                        format!("line {line_no}: '{field}' is not a pixel value >= 0"),
                    )
                })?;
            images.push(value);
        }
        if images.len() - start != PIXELS {
            return Err(bad(
                path,
                format!(
                    "line {line_no}: expected {PIXELS} pixel values after the label, found {}",
                    images.len() - start
                ),
            ));
        }
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(bad(path, "the file holds no examples".into()));
    }
    if images.iter().any(|&v| v > 1.0) {
        for v in &mut images {
            *v /= 255.0;
        }
    }
    Ok(Dataset { images, labels })
}

/// Reads `train.csv` and, when present, `test.csv` from the dataset folder (`data_dir`, then
/// `$FERRY_DATA`, then `/usr/share/datasets/csv`); without `test.csv` the test set is empty.
pub fn load(data_dir: Option<&Path>) -> Result<TrainTest, MlError> {
    let dir: PathBuf = FILES.locate(data_dir)?;
    let train = read(&dir.join("train.csv"))?;
    let test_path = dir.join("test.csv");
    let test = if test_path.is_file() {
        read(&test_path)?
    } else {
        Dataset {
            images: Vec::new(),
            labels: Vec::new(),
        }
    };
    Ok(TrainTest { train, test })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, value: &str) -> String {
        std::iter::once(label.to_string())
            .chain(std::iter::repeat_n(value.to_string(), PIXELS))
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn reads_pixels_in_either_scale() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("train.csv"),
            format!("{}\n{}\n", row("3", "255"), row("7", "0")),
        )
        .expect("write");
        std::fs::write(
            dir.path().join("test.csv"),
            format!("{}\n", row("1", "0.5")),
        )
        .expect("write");
        let data = load(Some(dir.path())).expect("loads");
        assert_eq!(data.train.labels, [3, 7]);
        assert!(data.train.image(0).iter().all(|&v| v == 1.0));
        assert!(data.train.image(1).iter().all(|&v| v == 0.0));
        assert_eq!(data.test.labels, [1]);
        assert!(data.test.image(0).iter().all(|&v| v == 0.5));
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("train.csv");
        for (text, needle) in [
            (
                format!("{}\n12,{}", row("1", "0"), "0,".repeat(783) + "0"),
                "line 2",
            ),
            ("1,0,0\n".to_string(), "expected 784"),
            (row("1", "x"), "'x'"),
            (String::new(), "no examples"),
        ] {
            std::fs::write(&path, text).expect("write");
            let err = read(&path).expect_err(needle).to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let empty = tempfile::tempdir().expect("tempdir");
        let err = load(Some(empty.path()))
            .expect_err("no train.csv")
            .to_string();
        assert!(err.contains("train.csv"), "{err}");
    }
}
