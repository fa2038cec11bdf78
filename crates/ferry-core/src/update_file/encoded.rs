//! Writing an update file: the header planned from the update and the model's layout, and
//! the bytes produced on demand from the update's own values.

use std::{collections::HashMap, io::Write, ops::Range};

use safetensors::tensor::Dtype;

use super::{COMPRESSED, COMPRESSION, METRIC, prefix};
use crate::{
    CoreError, ModelLayout, TensorDtype, Update,
    aggregate::Part,
    compress::Compression,
    tensor_file::{self, Planned},
};

/// One tensor of an update file: values of the update sent as they lie in memory (f32), or
/// encoded for the wire (a 2-byte dtype, or the whole delta compressed).
#[derive(Debug, Clone)]
enum Piece {
    /// These values of this vector, as f32.
    Values(Part, Range<usize>),
    /// Values encoded for the wire.
    Encoded(Vec<u8>),
}

/// An update file's tensors in file order.
type Pieces = Vec<Piece>;

/// The header of `update`'s file for `layout`, and its tensors in file order. With
/// `compressed`, the delta is that encoding's bytes as one tensor instead of a tensor per
/// model tensor.
fn update_header(
    update: &Update,
    layout: &ModelLayout,
    compressed: Option<(Compression, Vec<u8>)>,
) -> Result<(Vec<u8>, Pieces), CoreError> {
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
    let mut planned = Vec::new();
    let mut pieces = Vec::new();
    let mut parts = Vec::new();
    match &compressed {
        Some((_, bytes)) => {
            planned.push(Planned {
                name: COMPRESSED.to_string(),
                dtype: Dtype::U8,
                shape: vec![bytes.len()],
            });
            pieces.push(Piece::Encoded(bytes.clone()));
        }
        None => {
            check(&update.delta)?;
            parts.push(Part::Delta);
        }
    }
    if let Some(control) = &update.control_delta {
        check(control)?;
        parts.push(Part::Control);
    }
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
    if let Some((compression, _)) = &compressed {
        metadata.insert(COMPRESSION.into(), compression.to_string());
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
        let (header, pieces) = update_header(&update, layout, None)?;
        Ok(Self {
            header,
            pieces,
            update,
        })
    }

    /// Encodes `update` for the model `layout` with its delta compressed as the run asks:
    /// `residual` is top-k's error feedback (added first, left holding what was not sent;
    /// other encodings leave it alone) and `seed` drives int8's stochastic rounding. Without
    /// compression this is [`EncodedUpdate::new`].
    pub fn compressed(
        mut update: Update,
        layout: &ModelLayout,
        compression: Compression,
        residual: &mut Vec<f32>,
        seed: u64,
    ) -> Result<Self, CoreError> {
        if compression == Compression::None {
            return Self::new(update, layout);
        }
        if update.delta.len() != layout.num_params() {
            return Err(CoreError::LengthMismatch {
                expected: layout.num_params(),
                got: update.delta.len(),
            });
        }
        let bytes = compression.encode(&update.delta, residual, seed);
        // The file's delta is the encoding alone; the values are not needed again.
        update.delta = Vec::new();
        let (header, pieces) = update_header(&update, layout, Some((compression, bytes)))?;
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
    let (header, pieces) = update_header(update, layout, None)?;
    Ok(segments(&header, &pieces, update)
        .collect::<Vec<_>>()
        .concat())
}
