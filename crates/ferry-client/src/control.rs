//! A node's SCAFFOLD control variate `c_i`, kept in its state folder across rounds and
//! restarts (whichever trainer the node runs), replaced whole on every change.

use std::path::Path;

use ferry_core::wire;

/// The file in a node's state (or work) folder that holds its control variate.
pub const CONTROL_FILE: &str = "scaffold-control.safetensors";

/// The node's control variate kept at `path`; empty when it has none yet.
pub fn load(path: &Path) -> Result<Vec<f32>, String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(wire::decode_vectors(&bytes)
            .map_err(|e| {
                format!(
                    "{} is damaged ({e}); delete it to start SCAFFOLD from zero",
                    path.display()
                )
            })?
            .remove("control")
            .unwrap_or_default()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Replaces the node's control variate at `path` with `control`.
pub fn save(path: &Path, control: &[f32]) -> Result<(), String> {
    let bytes = wire::encode_vectors(&[("control", control)]).map_err(|e| e.to_string())?;
    crate::state_file::replace(path, &bytes).map_err(|e| {
        format!(
            "cannot save the node's control variate to {}: {e}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_variate_comes_back_as_saved_and_a_damaged_file_says_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONTROL_FILE);
        assert_eq!(load(&path).expect("none yet"), Vec::<f32>::new());
        save(&path, &[1.5, -2.0]).expect("saves");
        assert_eq!(load(&path).expect("loads"), [1.5, -2.0]);
        std::fs::write(&path, b"not a tensor file").expect("damage");
        let err = load(&path).expect_err("damaged");
        assert!(
            err.contains("delete it to start SCAFFOLD from zero"),
            "{err}"
        );
    }
}
