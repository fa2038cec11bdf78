//! A node's update as a safetensors file, read and written without a second copy of it.
//!
//! The file holds the delta as `delta/<tensor>` with the model's shapes (each in its wire
//! dtype: 2 bytes a value for an f16 or bf16 tensor, f32 otherwise; f32 is accepted for any),
//! SCAFFOLD's control-variate change as `control/<tensor>` in f32, and the scalars (`num_examples`, FedNova's
//! normaliser, the distributed-DP clip indicator `unclipped`, metrics as `metric.<name>`) in
//! the metadata. Anything else is refused, so a node cannot slip in tensors of the wrong name,
//! shape or dtype.
//!
//! [`UpdateFile`] reads such a file from disk a piece at a time (the server folds an upload
//! from its staging file this way); [`EncodedUpdate`] is an update with its header, whose
//! bytes are produced on demand at any offset (a node uploads and resumes from it).

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Seek, Write},
    ops::Range,
};

use safetensors::tensor::Dtype;

use crate::{
    CoreError, ModelLayout, TensorDtype, Update,
    aggregate::{Part, UpdateSource},
    algebra,
    partial::PartialMeta,
    tensor_file::{self, Planned, TensorReader, Visit},
    update::UpdateMeta,
};

const DELTA: &str = "delta/";
const CONTROL: &str = "control/";
const METRIC: &str = "metric.";

fn prefix(part: Part) -> &'static str {
    match part {
        Part::Delta => DELTA,
        Part::Control => CONTROL,
    }
}

fn parse_number<T: std::str::FromStr>(key: &str, text: &str) -> Result<T, CoreError> {
    text.parse()
        .map_err(|_| CoreError::Safetensors(format!("metadata '{key}' is not a number: '{text}'")))
}

fn read_meta(
    metadata: &HashMap<String, String>,
    has_control: bool,
    value_bytes: u64,
) -> Result<UpdateMeta, CoreError> {
    let num_examples = metadata
        .get("num_examples")
        .ok_or_else(|| CoreError::Safetensors("update metadata lacks 'num_examples'".into()))
        .and_then(|text| parse_number("num_examples", text))?;
    let optional = |key: &str| {
        metadata
            .get(key)
            .map(|text| parse_number(key, text))
            .transpose()
    };
    let metrics = metadata
        .iter()
        .filter_map(|(key, text)| key.strip_prefix(METRIC).map(|name| (key, name, text)))
        .map(|(key, name, text)| Ok((name.to_string(), parse_number(key, text)?)))
        .collect::<Result<BTreeMap<_, _>, CoreError>>()?;
    crate::update::check_metric_names(metrics.keys().map(String::as_str))
        .map_err(CoreError::Safetensors)?;
    Ok(UpdateMeta {
        num_examples,
        metrics,
        normalizer: optional("normalizer")?,
        unclipped: optional("unclipped")?,
        has_control,
        partial: PartialMeta::read(metadata, num_examples)?,
        value_bytes,
    })
}

/// An update file opened for the model `layout`: its tensors checked against the layout and
/// its scalars read; its values are read on demand.
#[derive(Debug)]
pub struct UpdateFile<R> {
    file: TensorReader<R>,
    tensors: Vec<(String, Range<usize>)>,
    meta: UpdateMeta,
    checked: bool,
}

impl<R: Read + Seek> UpdateFile<R> {
    /// Opens the update in `source`, refusing unknown, missing or misshapen tensors and any
    /// dtype but f32 or, for a delta, its tensor's wire dtype.
    pub fn open(source: R, layout: &ModelLayout) -> Result<Self, CoreError> {
        let file = TensorReader::open(source)?;
        let spec_of = |name: &str| {
            let bare = name
                .strip_prefix(DELTA)
                .or_else(|| name.strip_prefix(CONTROL))?;
            layout.specs().iter().find(|s| s.name == bare)
        };
        if let Some(foreign) = file.entries().iter().find(|e| spec_of(&e.name).is_none()) {
            return Err(CoreError::LayoutMismatch(format!(
                "update holds tensor '{}', which the model does not have",
                foreign.name
            )));
        }
        for entry in file.entries() {
            let wire = spec_of(&entry.name)
                .filter(|_| entry.name.starts_with(DELTA))
                .map_or(Dtype::F32, |s| s.dtype.on_the_wire().safetensors());
            if entry.dtype != Dtype::F32 && entry.dtype != wire {
                return Err(CoreError::UnsupportedDtype {
                    name: entry.name.clone(),
                    dtype: format!("{:?}", entry.dtype),
                });
            }
            if let Some(spec) = spec_of(&entry.name).filter(|s| s.shape != entry.shape) {
                return Err(CoreError::LayoutMismatch(format!(
                    "tensor '{}' has shape {:?}, the model's is {:?}",
                    entry.name, entry.shape, spec.shape
                )));
            }
        }
        let holds = |part: Part| {
            layout
                .specs()
                .iter()
                .filter(|spec| {
                    file.entry(&format!("{}{}", prefix(part), spec.name))
                        .is_some()
                })
                .count()
        };
        let tensors = layout.specs().len();
        if holds(Part::Delta) != tensors {
            return Err(CoreError::LayoutMismatch(format!(
                "update holds {} of the model's {tensors} delta tensors",
                holds(Part::Delta)
            )));
        }
        let has_control = match holds(Part::Control) {
            0 => false,
            n if n == tensors => true,
            n => {
                return Err(CoreError::LayoutMismatch(format!(
                    "update holds {n} of the model's {tensors} control tensors"
                )));
            }
        };
        let value_bytes = file
            .entries()
            .iter()
            .map(|e| (e.len() * TensorDtype::of(e.dtype).map_or(4, TensorDtype::size)) as u64)
            .sum();
        let meta = read_meta(file.metadata(), has_control, value_bytes)?;
        Ok(Self {
            tensors: layout
                .entries()
                .map(|(spec, range)| (spec.name.clone(), range))
                .collect(),
            file,
            meta,
            checked: false,
        })
    }
}

impl<R: Read + Seek> UpdateFile<R> {
    fn read_part(&mut self, part: Part) -> Result<Vec<f32>, CoreError> {
        let dim = self.tensors.last().map_or(0, |(_, r)| r.end);
        let mut values = vec![0.0f32; dim];
        self.visit(part, &mut |at, piece| {
            values[at..at + piece.len()].copy_from_slice(piece);
            Ok(())
        })?;
        Ok(values)
    }
}

impl<R: Read + Seek> UpdateSource for UpdateFile<R> {
    fn meta(&self) -> &UpdateMeta {
        &self.meta
    }

    fn check(&mut self) -> Result<(), CoreError> {
        if self.checked {
            return Ok(());
        }
        if self.meta.num_examples == 0 {
            return Err(CoreError::ZeroExamples);
        }
        let parts: &[Part] = if self.meta.has_control {
            &[Part::Delta, Part::Control]
        } else {
            &[Part::Delta]
        };
        for &part in parts {
            self.visit(
                part,
                &mut |at, values| match algebra::first_non_finite(values) {
                    Some(i) => Err(CoreError::NonFinite { index: at + i }),
                    None => Ok(()),
                },
            )?;
        }
        self.checked = true;
        Ok(())
    }

    fn visit(&mut self, part: Part, visit: &mut Visit<'_>) -> Result<(), CoreError> {
        if part == Part::Control && !self.meta.has_control {
            return Ok(());
        }
        for (name, range) in &self.tensors {
            let start = range.start;
            self.file
                .visit_f32(&format!("{}{name}", prefix(part)), &mut |at, values| {
                    visit(start + at, values)
                })?;
        }
        Ok(())
    }

    fn read_whole(&mut self) -> Result<Update, CoreError> {
        let delta = self.read_part(Part::Delta)?;
        let control_delta = if self.meta.has_control {
            Some(self.read_part(Part::Control)?)
        } else {
            None
        };
        let meta = self.meta.clone();
        Ok(Update {
            delta,
            num_examples: meta.num_examples,
            metrics: meta.metrics,
            control_delta,
            normalizer: meta.normalizer,
            unclipped: meta.unclipped,
            partial: meta.partial,
        })
    }
}

/// One tensor of an update file: values of the update sent as they lie in memory (f32), or
/// encoded in a 2-byte wire dtype.
#[derive(Debug, Clone)]
enum Piece {
    /// These values of this vector, as f32.
    Values(Part, Range<usize>),
    /// Values encoded for the wire.
    Encoded(Vec<u8>),
}

/// An update file's tensors in file order.
type Pieces = Vec<Piece>;

/// The header of `update`'s file for `layout`, and its tensors in file order.
fn update_header(update: &Update, layout: &ModelLayout) -> Result<(Vec<u8>, Pieces), CoreError> {
    let check = |values: &[f32]| {
        if values.len() == layout.num_params() {
            Ok(())
        } else {
            Err(CoreError::LengthMismatch {
                expected: layout.num_params(),
                got: values.len(),
            })
        }
    };
    check(&update.delta)?;
    let mut parts = vec![Part::Delta];
    if let Some(control) = &update.control_delta {
        check(control)?;
        parts.push(Part::Control);
    }
    let mut planned = Vec::new();
    let mut pieces = Vec::new();
    for part in parts {
        for (spec, range) in layout.entries() {
            // A relay's partial aggregate is a sum, which keeps f32's precision.
            let wire = match (part, &update.partial) {
                (Part::Delta, None) => spec.dtype.on_the_wire(),
                _ => TensorDtype::F32,
            };
            planned.push(Planned {
                name: format!("{}{}", prefix(part), spec.name),
                dtype: wire.safetensors(),
                shape: spec.shape.clone(),
            });
            pieces.push(match wire {
                TensorDtype::F32 => Piece::Values(part, range),
                _ => {
                    let mut bytes = Vec::new();
                    wire.encode_into(&update.delta[range], &mut bytes);
                    Piece::Encoded(bytes)
                }
            });
        }
    }
    let mut metadata =
        HashMap::from([("num_examples".to_string(), update.num_examples.to_string())]);
    if let Some(normalizer) = update.normalizer {
        metadata.insert("normalizer".into(), normalizer.to_string());
    }
    if let Some(unclipped) = update.unclipped {
        metadata.insert("unclipped".into(), unclipped.to_string());
    }
    for (name, value) in &update.metrics {
        metadata.insert(format!("{METRIC}{name}"), value.to_string());
    }
    if let Some(partial) = &update.partial {
        partial.write(&mut metadata);
    }
    let (header, order) = tensor_file::header(&planned, Some(metadata))?;
    Ok((
        header,
        order.into_iter().map(|i| pieces[i].clone()).collect(),
    ))
}

/// The bytes of `update`'s file, in order: its header, then each tensor's values as they lie
/// in the update.
fn segments<'a>(
    header: &'a [u8],
    pieces: &'a Pieces,
    update: &'a Update,
) -> impl Iterator<Item = &'a [u8]> {
    let values = |part: Part| match part {
        Part::Delta => update.delta.as_slice(),
        Part::Control => update.control_delta.as_deref().unwrap_or_default(),
    };
    std::iter::once(header).chain(pieces.iter().map(move |piece| match piece {
        Piece::Values(part, range) => bytemuck::cast_slice(&values(*part)[range.clone()]),
        Piece::Encoded(bytes) => bytes.as_slice(),
    }))
}

/// An update ready to send: its file's bytes are its header followed by its own values, so
/// they are read at any offset without being assembled.
#[derive(Debug, Clone)]
pub struct EncodedUpdate {
    header: Vec<u8>,
    pieces: Pieces,
    update: Update,
}

impl EncodedUpdate {
    /// Encodes `update` for the model `layout`.
    pub fn new(update: Update, layout: &ModelLayout) -> Result<Self, CoreError> {
        let (header, pieces) = update_header(&update, layout)?;
        Ok(Self {
            header,
            pieces,
            update,
        })
    }

    fn segments(&self) -> impl Iterator<Item = &[u8]> {
        segments(&self.header, &self.pieces, &self.update)
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.segments().map(|s| s.len() as u64).sum()
    }

    /// Whether the file is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The file's content id (see [`crate::content`]), which names it in the blob store.
    pub fn content_id(&self) -> String {
        let mut hasher = crate::content::ContentHasher::new();
        for segment in self.segments() {
            hasher.update(segment);
        }
        hasher.finish()
    }

    /// Fills `out` with the file's bytes from `offset`; returns how many it filled (fewer at
    /// the end of the file).
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> usize {
        let mut skip = offset;
        let mut filled = 0;
        for segment in self.segments() {
            if filled == out.len() {
                break;
            }
            if skip >= segment.len() as u64 {
                skip -= segment.len() as u64;
                continue;
            }
            let from = &segment[skip as usize..];
            let n = from.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&from[..n]);
            filled += n;
            skip = 0;
        }
        filled
    }

    /// Writes the whole file to `out`.
    pub fn write_to(&self, out: &mut dyn Write) -> Result<(), CoreError> {
        for segment in self.segments() {
            out.write_all(segment)
                .map_err(|e| CoreError::Io(e.to_string()))?;
        }
        Ok(())
    }
}

/// Serialises an update for the model `layout` as a safetensors file.
pub fn encode_update(update: &Update, layout: &ModelLayout) -> Result<Vec<u8>, CoreError> {
    let (header, pieces) = update_header(update, layout)?;
    Ok(segments(&header, &pieces, update)
        .collect::<Vec<_>>()
        .concat())
}

/// Reads an update file written by [`encode_update`] (or any writer of the same tensors) for
/// the model `layout`. Values are not checked for NaN here; the aggregator does that.
pub fn decode_update(bytes: &[u8], layout: &ModelLayout) -> Result<Update, CoreError> {
    UpdateFile::open(std::io::Cursor::new(bytes), layout)?.read_whole()
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use safetensors::tensor::TensorView;

    use super::*;
    use crate::{TensorSpec, wire::encode_vectors};

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
}
