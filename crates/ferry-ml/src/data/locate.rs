//! Where Ferry looks for dataset files.

use std::path::{Path, PathBuf};

use crate::MlError;

/// Environment variable naming a folder of datasets (or one dataset's folder).
pub const DATA_ENV: &str = "FERRY_DATA";

/// System folder that Debian's `dataset-*` packages install into.
pub const SYSTEM_DATASETS: &str = "/usr/share/datasets";

/// A dataset's on-disk identity: its folder name and the files that must all be present.
pub struct DatasetFiles {
    /// Human name for messages.
    pub title: &'static str,
    /// Folder name under a datasets root.
    pub folder: &'static str,
    /// Files that must all exist in the folder.
    pub required: &'static [&'static str],
    /// How to install the dataset, for the not-found message.
    pub hint: &'static str,
}

impl DatasetFiles {
    /// The first folder holding every required file, searching `explicit`, then `$FERRY_DATA`,
    /// then the system folder; each root is tried as the dataset folder itself and as a parent
    /// of `folder`.
    pub fn locate(&self, explicit: Option<&Path>) -> Result<PathBuf, MlError> {
        let env = std::env::var_os(DATA_ENV).map(PathBuf::from);
        let roots = explicit
            .map(Path::to_path_buf)
            .into_iter()
            .chain(env)
            .chain(std::iter::once(PathBuf::from(SYSTEM_DATASETS)));
        let mut searched = Vec::new();
        for root in roots {
            for dir in [root.clone(), root.join(self.folder)] {
                if self.required.iter().all(|f| dir.join(f).is_file()) {
                    return Ok(dir);
                }
                if !searched.contains(&dir) {
                    searched.push(dir);
                }
            }
        }
        Err(MlError::DatasetNotFound {
            dataset: self.title,
            searched,
            hint: self.hint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILES: DatasetFiles = DatasetFiles {
        title: "Test set",
        folder: "test-set",
        required: &["a.bin", "b.bin"],
        hint: "install it",
    };

    #[test]
    fn finds_files_in_the_folder_itself_or_a_named_subfolder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let nested = tmp.path().join("test-set");
        std::fs::create_dir(&nested).expect("mkdir");
        for f in FILES.required {
            std::fs::write(nested.join(f), b"x").expect("write");
        }
        assert_eq!(FILES.locate(Some(tmp.path())).expect("found"), nested);
        assert_eq!(FILES.locate(Some(&nested)).expect("found"), nested);
    }

    #[test]
    fn missing_files_name_where_we_looked_and_how_to_install() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("a.bin"), b"x").expect("write");
        let err = FILES.locate(Some(tmp.path())).expect_err("b.bin missing");
        let text = err.to_string();
        assert!(text.starts_with("Test set not found"), "{text}");
        assert!(text.contains(&tmp.path().display().to_string()), "{text}");
        assert!(text.ends_with("install it"), "{text}");
        assert!(!text.contains('\n'));
    }
}
