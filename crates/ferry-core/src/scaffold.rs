//! SCAFFOLD's node-side arithmetic (Karimireddy et al., ICML 2020, option II), shared by the
//! built-in trainer and the external-command trainer: the correction a node adds to every
//! local gradient, and the change of its control variate after local training.

/// Makes the node's control variate `own` fit a model of `len` parameters: kept when it does,
/// zero when it is missing (the node's first SCAFFOLD round) or was kept for another model.
pub fn fit(own: &mut Vec<f32>, len: usize) {
    if own.len() != len {
        own.clear();
        own.resize(len, 0.0);
    }
}

/// `c - c_i`: what a node adds to each local gradient, from the server's control variate `c`
/// (zero until the server has one) and the node's own `c_i` (zero until set; `own` is the
/// model's length).
pub fn correction(server: Option<&[f32]>, own: &[f32]) -> Vec<f32> {
    match server.filter(|c| !c.is_empty()) {
        Some(c) => c.iter().zip(own).map(|(c, ci)| c - ci).collect(),
        None => own.iter().map(|ci| -ci).collect(),
    }
}

/// `c_i+ - c_i = -c + (x - y) / (K * lr)`: the change of the node's control variate after
/// `steps` (K) local SGD steps at `lr` moved the model by `delta` (`y - x`). The node adds it to
/// its `c_i` and sends it with its update.
pub fn control_change(delta: &[f32], steps: u64, lr: f64, server: Option<&[f32]>) -> Vec<f32> {
    let scale = -1.0 / (steps.max(1) as f64 * lr) as f32;
    let server = server.filter(|c| !c.is_empty());
    delta
        .iter()
        .enumerate()
        .map(|(j, d)| scale * d - server.map_or(0.0, |c| c[j]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variate_is_kept_when_it_fits_and_zero_otherwise() {
        let mut own = vec![1.0, 2.0];
        fit(&mut own, 2);
        assert_eq!(own, [1.0, 2.0]);
        fit(&mut own, 3);
        assert_eq!(own, [0.0; 3]);
        let mut none = Vec::new();
        fit(&mut none, 2);
        assert_eq!(none, [0.0; 2]);
    }

    #[test]
    fn the_correction_is_the_servers_variate_less_the_nodes() {
        assert_eq!(correction(Some(&[1.0, 2.0]), &[0.5, -1.0]), [0.5, 3.0]);
        assert_eq!(correction(None, &[0.5, -1.0]), [-0.5, 1.0]);
        assert_eq!(correction(Some(&[]), &[0.5]), [-0.5]);
    }

    #[test]
    fn the_change_takes_the_mean_step_and_removes_the_servers_variate() {
        // Two steps at lr 0.5 moved the model by -1 and +2: the mean gradient was 1 and -2.
        let change = control_change(&[-1.0, 2.0], 2, 0.5, Some(&[0.25, 0.0]));
        assert_eq!(change, [0.75, -2.0]);
        assert_eq!(
            control_change(&[-1.0], 0, 1.0, None),
            [1.0],
            "no steps: one"
        );
    }
}
