//! The IDX format (gzip-compressed) of MNIST-style datasets, and Fashion-MNIST on top of it.

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
};

use flate2::read::GzDecoder;

use super::{Dataset, PIXELS, TrainTest, locate::DatasetFiles};
use crate::MlError;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Fashion-MNIST as installed by Debian's `dataset-fashion-mnist` package.
pub const FASHION_MNIST: DatasetFiles = DatasetFiles {
    title: "Fashion-MNIST",
    folder: "fashion-mnist",
    required: &[
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ],
    hint: "install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir DIR",
};

/// Reads Fashion-MNIST's training and test sets.
pub fn load_fashion_mnist(data_dir: Option<&Path>) -> Result<TrainTest, MlError> {
    let dir = FASHION_MNIST.locate(data_dir)?;
    Ok(TrainTest {
        train: read_pair(&dir, "train")?,
        test: read_pair(&dir, "t10k")?,
    })
}

fn read_pair(dir: &Path, prefix: &str) -> Result<Dataset, MlError> {
    let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let images = read_images(&images_path)?;
    let labels = read_labels(&labels_path)?;
    if images.len() != labels.len() * PIXELS {
        return Err(MlError::BadDataFile {
            path: labels_path,
            reason: format!(
                "{} labels for {} images",
                labels.len(),
                images.len() / PIXELS
            ),
        });
    }
    Ok(Dataset { images, labels })
}

fn bad(path: &Path, reason: impl Into<String>) -> MlError {
    MlError::BadDataFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_gz(path: &Path) -> Result<Vec<u8>, MlError> {
    let file = File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let mut bytes = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(path, format!("not a gzip file ({e})")))?;
    Ok(bytes)
}

fn be_u32(bytes: &[u8], at: usize, path: &Path) -> Result<usize, MlError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad(path, "truncated header"))
}

/// Reads an IDX3 image file into `[0, 1]` pixels (28x28 images only).
pub fn read_images(path: &Path) -> Result<Vec<f32>, MlError> {
    let bytes = read_gz(path)?;
    if be_u32(&bytes, 0, path)? != IMAGES_MAGIC as usize {
        return Err(bad(path, "not an IDX image file (bad magic number)"));
    }
    let count = be_u32(&bytes, 4, path)?;
    let (rows, cols) = (be_u32(&bytes, 8, path)?, be_u32(&bytes, 12, path)?);
    if rows * cols != PIXELS {
        return Err(bad(
            path,
            format!("images are {rows}x{cols}, expected 28x28"),
        ));
    }
    let body = &bytes[16..];
    if body.len() != count * PIXELS {
        return Err(bad(
            path,
            format!(
                "header says {count} images but the file holds {} bytes of pixels",
                body.len()
            ),
        ));
    }
    Ok(body.iter().map(|&p| f32::from(p) / 255.0).collect())
}

/// Reads an IDX1 label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, MlError> {
    let bytes = read_gz(path)?;
    if be_u32(&bytes, 0, path)? != LABELS_MAGIC as usize {
        return Err(bad(path, "not an IDX label file (bad magic number)"));
    }
    let count = be_u32(&bytes, 4, path)?;
    let body = &bytes[8..];
    if body.len() != count {
        return Err(bad(
            path,
            format!("header says {count} labels, file holds {}", body.len()),
        ));
    }
    if let Some(l) = body.iter().find(|&&l| usize::from(l) >= super::NUM_CLASSES) {
        return Err(bad(path, format!("label {l} is outside 0..=9")));
    }
    Ok(body.to_vec())
}

/// Writes gzip-compressed IDX files; used by tests to build small datasets on disk.
pub fn write_idx_pair(dir: &Path, prefix: &str, data: &Dataset) -> std::io::Result<[PathBuf; 2]> {
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;
    let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let n = data.len() as u32;
    let mut enc = GzEncoder::new(File::create(&images_path)?, Compression::fast());
    for v in [IMAGES_MAGIC, n, 28, 28] {
        enc.write_all(&v.to_be_bytes())?;
    }
    let pixels: Vec<u8> = data
        .images
        .iter()
        .map(|p| (p * 255.0).round() as u8)
        .collect();
    enc.write_all(&pixels)?;
    enc.finish()?;
    let mut enc = GzEncoder::new(File::create(&labels_path)?, Compression::fast());
    for v in [LABELS_MAGIC, n] {
        enc.write_all(&v.to_be_bytes())?;
    }
    enc.write_all(&data.labels)?;
    enc.finish()?;
    Ok([images_path, labels_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            images: (0..3 * PIXELS).map(|i| (i % 256) as f32 / 255.0).collect(),
            labels: vec![0, 7, 9],
        }
    }

    #[test]
    fn round_trips_through_idx_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write_idx_pair(tmp.path(), "train", &tiny()).expect("write");
        let back = read_pair(tmp.path(), "train").expect("read");
        assert_eq!(back.labels, [0, 7, 9]);
        for (a, b) in back.images.iter().zip(&tiny().images) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn finds_a_dataset_folder_given_as_data_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write_idx_pair(tmp.path(), "train", &tiny()).expect("write");
        write_idx_pair(tmp.path(), "t10k", &tiny()).expect("write");
        let data = load_fashion_mnist(Some(tmp.path())).expect("load");
        assert_eq!((data.train.len(), data.test.len()), (3, 3));
    }

    #[test]
    fn labels_swapped_for_images_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let [images, labels] = write_idx_pair(tmp.path(), "train", &tiny()).expect("write");
        assert!(read_labels(&images).is_err());
        assert!(read_images(&labels).is_err());
    }

    #[test]
    fn a_plain_text_file_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("x.gz");
        std::fs::write(&path, "hello").expect("write");
        let err = read_images(&path).expect_err("not gzip");
        assert!(err.to_string().contains("gzip"), "{err}");
    }
}
