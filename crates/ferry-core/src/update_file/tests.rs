//! The update file's round trips, checks and refusals.

use std::io::Cursor;

use safetensors::tensor::TensorView;

use super::*;
use crate::{TensorSpec, wire::encode_vectors};

use crate::compress::Compression;

fn layout() -> ModelLayout {
    ModelLayout::new(vec![
        TensorSpec::f32("w", vec![2, 2]),
        TensorSpec::f32("b", vec![2]),
    ])
    .expect("layout")
}

fn full_update() -> Update {
    let mut update = Update::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 42);
    update.control_delta = Some(vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
    update.normalizer = Some(9.5);
    update.unclipped = Some(0.75);
    update.metrics.insert("train_loss".into(), 0.25);
    update
}

#[test]
fn updates_round_trip_with_every_extra() {
    let layout = layout();
    for update in [full_update(), Update::new(vec![0.5; 6], 1)] {
        let bytes = encode_update(&update, &layout).expect("encode");
        assert_eq!(decode_update(&bytes, &layout).expect("decode"), update);
    }
}

#[test]
fn an_encoded_update_reads_at_any_offset_the_bytes_of_the_whole_file() {
    let layout = layout();
    let encoded = EncodedUpdate::new(full_update(), &layout).expect("encode");
    let mut whole = Vec::new();
    encoded.write_to(&mut whole).expect("write");
    assert_eq!(encoded.len(), whole.len() as u64);
    assert_eq!(encoded.content_id(), crate::content::content_id(&whole));
    assert_eq!(
        decode_update(&whole, &layout).expect("decode"),
        full_update()
    );
    for chunk in [1, 7, 64, 1000] {
        let mut joined = Vec::new();
        let mut buffer = vec![0u8; chunk];
        loop {
            let n = encoded.read_at(joined.len() as u64, &mut buffer);
            if n == 0 {
                break;
            }
            joined.extend_from_slice(&buffer[..n]);
        }
        assert_eq!(joined, whole, "chunks of {chunk}");
    }
}

#[test]
fn a_file_is_checked_and_visited_in_place() {
    let layout = layout();
    let mut update = full_update();
    update.delta[5] = f32::NAN;
    let bytes = encode_update(&update, &layout).expect("encode");
    let mut file = UpdateFile::open(Cursor::new(bytes), &layout).expect("open");
    assert_eq!(file.meta().num_examples, 42);
    assert!(file.meta().has_control);
    assert!(matches!(
        file.check(),
        Err(CoreError::NonFinite { index: 5 })
    ));
    let mut seen = Vec::new();
    file.visit(Part::Control, &mut |at, values| {
        seen.push((at, values.to_vec()));
        Ok(())
    })
    .expect("visit");
    // Layout order: b (2 values) then w (4).
    assert_eq!(
        seen,
        [(0, vec![-1.0, -2.0]), (2, vec![-3.0, -4.0, -5.0, -6.0])]
    );
}

#[test]
fn foreign_missing_and_misshapen_tensors_are_refused() {
    let layout = layout();
    let other = ModelLayout::new(vec![
        TensorSpec::f32("w", vec![4]),
        TensorSpec::f32("b", vec![2]),
    ])
    .expect("layout");
    let bytes = encode_update(&Update::new(vec![0.0; 6], 1), &other).expect("encode");
    let err = decode_update(&bytes, &layout).expect_err("shape differs");
    assert!(err.to_string().contains("shape [4]"), "{err}");

    let extra = encode_vectors(&[("delta/w", &[0.0; 4]), ("evil", &[1.0])]).expect("encode");
    let err = decode_update(&extra, &layout).expect_err("unknown tensor");
    assert!(err.to_string().contains("'evil'"), "{err}");

    let missing = encode_vectors(&[("delta/w", &[0.0; 4])]).expect("encode");
    let err = decode_update(&missing, &layout).expect_err("b missing");
    assert!(matches!(err, CoreError::LayoutMismatch(_)), "{err}");
}

fn half_layout(dtype: TensorDtype) -> ModelLayout {
    ModelLayout::new(vec![
        TensorSpec {
            name: "w".into(),
            shape: vec![2, 2],
            dtype,
        },
        TensorSpec {
            name: "b".into(),
            shape: vec![2],
            dtype: TensorDtype::F64,
        },
    ])
    .expect("layout")
}

#[test]
fn half_precision_deltas_travel_in_two_bytes_and_f32_ones_are_still_read() {
    for dtype in [TensorDtype::F16, TensorDtype::Bf16] {
        let half_model = half_layout(dtype);
        let update = full_update();
        let half = EncodedUpdate::new(update.clone(), &half_model).expect("encode");
        let mut bytes = Vec::new();
        half.write_to(&mut bytes).expect("write");
        let mut file = UpdateFile::open(Cursor::new(&bytes), &half_model).expect("open");
        // w's 4 delta values in 2 bytes; f64's delta and every control change in f32.
        assert_eq!(file.meta().value_bytes, 4 * 2 + 2 * 4 + 6 * 4);
        let back = file.read_whole().expect("read");
        // Small integers are exact in both half formats.
        assert_eq!(back.delta, update.delta);
        assert_eq!(back.control_delta, update.control_delta);
        // An update of the same shapes in f32 (an older node's) is read as before.
        let f32_file = encode_update(&update, &layout()).expect("encode");
        let file = UpdateFile::open(Cursor::new(&f32_file), &half_model).expect("open");
        assert_eq!(file.meta().value_bytes, 12 * 4);
    }
}

#[test]
fn a_tensor_in_another_half_dtype_is_refused_and_partial_sums_stay_f32() {
    let update = Update::new(vec![1.0; 6], 3);
    let bf16 = encode_update(&update, &half_layout(TensorDtype::Bf16)).expect("encode");
    let err = decode_update(&bf16, &half_layout(TensorDtype::F16)).expect_err("dtype");
    assert!(matches!(err, CoreError::UnsupportedDtype { .. }), "{err}");
    let layout = half_layout(TensorDtype::Bf16);
    let mut partial = update;
    partial.partial = Some(PartialMeta {
        weighting: crate::aggregate::Weighting::Examples,
        weight: 3.0,
        normalized_examples: 3.0,
        unclipped: 0.0,
        train_loss_sum: 0.0,
        train_losses: 0,
        contributors: vec![("n1".into(), 3)],
    });
    let sum = encode_update(&partial, &layout).expect("encode");
    let file = UpdateFile::open(Cursor::new(&sum), &layout).expect("open");
    assert_eq!(file.meta().value_bytes, 6 * 4);
}

#[test]
fn an_update_without_example_count_is_refused() {
    let layout = layout();
    let zeros = [0u8; 16];
    let tensors = vec![
        (
            "delta/b",
            TensorView::new(Dtype::F32, vec![2], &zeros[..8]).expect("view"),
        ),
        (
            "delta/w",
            TensorView::new(Dtype::F32, vec![2, 2], &zeros).expect("view"),
        ),
    ];
    let bytes = safetensors::serialize(tensors, None).expect("serialize");
    let err = decode_update(&bytes, &layout).expect_err("no num_examples");
    assert!(err.to_string().contains("num_examples"), "{err}");
    assert!(decode_update(b"not safetensors", &layout).is_err());
}

#[test]
fn a_compressed_delta_decodes_to_what_its_encoding_sends_and_counts_its_bytes() {
    let layout = layout();
    for compression in [
        Compression::Fp16,
        Compression::Bf16,
        Compression::Int8,
        Compression::TopK { ratio: 0.5 },
    ] {
        let update = full_update();
        let mut residual = Vec::new();
        let encoded =
            EncodedUpdate::compressed(update.clone(), &layout, compression, &mut residual, 7)
                .expect("encode");
        let mut bytes = Vec::new();
        encoded.write_to(&mut bytes).expect("write");
        let mut file = UpdateFile::open(Cursor::new(&bytes), &layout).expect("open");
        assert_eq!(file.meta().compression, compression);
        // The delta's encoding, and the control change in f32.
        assert_eq!(
            file.meta().value_bytes,
            compression.wire_bytes(6) + 6 * 4,
            "{compression}"
        );
        let back = file.read_whole().expect("read");
        // What the simulated wire gives for the same values, residual and seed.
        let mut expected = update.delta.clone();
        compression
            .round_trip(&mut expected, &mut Vec::new(), 7)
            .expect("round trip");
        assert_eq!(back.delta, expected, "{compression}");
        assert_eq!(back.control_delta, update.control_delta);
        assert_eq!(back.num_examples, 42);
        let kept: f32 = residual.iter().map(|r| r.abs()).sum();
        match compression {
            // Top-k 50% of 1..6 sends 4, 5, 6 and keeps 1, 2, 3 on the node.
            Compression::TopK { .. } => assert_eq!(residual, [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]),
            _ => assert_eq!(kept, 0.0, "{compression} keeps no residual"),
        }
    }
}

#[test]
fn a_compressed_delta_of_the_wrong_length_or_without_its_name_is_refused() {
    let layout = layout();
    let update = Update::new(vec![1.0; 6], 3);
    let encoded = EncodedUpdate::compressed(update, &layout, Compression::Int8, &mut Vec::new(), 0)
        .expect("encode");
    let mut bytes = Vec::new();
    encoded.write_to(&mut bytes).expect("write");
    // The same encoding read for a model of other size.
    let bigger = ModelLayout::new(vec![
        TensorSpec::f32("w", vec![2, 2]),
        TensorSpec::f32("b", vec![3]),
    ])
    .expect("layout");
    let err = UpdateFile::open(Cursor::new(&bytes), &bigger).expect_err("length");
    assert!(matches!(err, CoreError::Compression(_)), "{err}");
    // The tensor without the metadata that names its encoding.
    let raw = [0u8; 16];
    let tensors = vec![(
        COMPRESSED,
        TensorView::new(Dtype::U8, vec![16], &raw).expect("view"),
    )];
    let metadata = HashMap::from([("num_examples".to_string(), "1".to_string())]);
    let bare = safetensors::serialize(tensors, Some(metadata)).expect("serialize");
    let err = decode_update(&bare, &layout).expect_err("unnamed");
    assert!(err.to_string().contains(COMPRESSION), "{err}");
    // An unknown encoding is refused by name.
    let at = bytes
        .windows(6)
        .position(|w| w == b"\"int8\"")
        .expect("the encoding's name in the header");
    bytes[at + 4] = b'9';
    let err = decode_update(&bytes, &layout).expect_err("unknown");
    assert!(err.to_string().contains("int9"), "{err}");
}
