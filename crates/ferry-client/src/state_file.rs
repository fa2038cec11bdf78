//! Files in the node's state folder, replaced whole: written beside their place and renamed
//! over it, so that a crash leaves the old file or the new one, never half of one.

use std::path::Path;

use crate::ClientError;

/// Replaces the file at `path` with `bytes`, creating its folder if need be.
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let io = |context: String| move |source| ClientError::Io { context, source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    let tmp = std::path::PathBuf::from(name);
    std::fs::write(&tmp, bytes).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_in_a_folder_made_for_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("deep/state.bin");
        replace(&path, b"first").expect("write");
        replace(&path, b"second").expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("deep"))
            .expect("folder")
            .collect();
        assert_eq!(left.len(), 1, "no temporary file is left behind");
    }
}
