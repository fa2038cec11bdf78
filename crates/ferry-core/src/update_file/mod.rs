//! A node's update as a safetensors file, read and written without a second copy of it.
//!
//! The file holds the delta as `delta/<tensor>` with the model's shapes (each in its wire
//! dtype: 2 bytes a value for an f16 or bf16 tensor, f32 otherwise; f32 is accepted for any),
//! SCAFFOLD's control-variate change as `control/<tensor>` in f32, and the scalars (`num_examples`, FedNova's
//! normaliser, the distributed-DP clip indicator `unclipped`, metrics as `metric.<name>`) in
//! the metadata. A compressed update (see [`crate::compress`]) holds its delta instead as one
//! byte tensor `compressed/delta`, the encoding of the whole delta in layout order, and names
//! the encoding in the metadata key `compression`. Anything else is refused, so a node cannot
//! slip in tensors of the wrong name, shape or dtype.
//!
//! [`UpdateFile`] reads such a file from disk a piece at a time (the server folds an upload
//! from its staging file this way); [`EncodedUpdate`] is an update with its header, whose
//! bytes are produced on demand at any offset (a node uploads and resumes from it).

mod encoded;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Seek},
    ops::Range,
};

use safetensors::tensor::Dtype;

pub use self::encoded::{EncodedUpdate, encode_update};
use crate::{
    CoreError, ModelLayout, TensorDtype, Update,
    aggregate::{Part, UpdateSource},
    algebra,
    compress::Compression,
    partial::PartialMeta,
    tensor_file::{TensorReader, Visit},
    update::UpdateMeta,
};

const DELTA: &str = "delta/";
const CONTROL: &str = "control/";
const METRIC: &str = "metric.";
/// The tensor holding a compressed delta's encoding.
const COMPRESSED: &str = "compressed/delta";
/// The metadata key naming a compressed delta's encoding.
const COMPRESSION: &str = "compression";

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
    compression: Compression,
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
        compression,
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
    /// Opens the update in `source`, refusing unknown, missing or misshapen tensors, any
    /// dtype but f32 or, for a delta, its tensor's wire dtype, and a compressed delta of the
    /// wrong length for its encoding.
    pub fn open(source: R, layout: &ModelLayout) -> Result<Self, CoreError> {
        let file = TensorReader::open(source)?;
        let compression = compression_of(&file, layout)?;
        let spec_of = |name: &str| {
            let bare = name
                .strip_prefix(DELTA)
                .or_else(|| name.strip_prefix(CONTROL))?;
            layout.specs().iter().find(|s| s.name == bare)
        };
        if let Some(foreign) = file
            .entries()
            .iter()
            .find(|e| spec_of(&e.name).is_none() && e.name != COMPRESSED)
        {
            return Err(CoreError::LayoutMismatch(format!(
                "update holds tensor '{}', which the model does not have",
                foreign.name
            )));
        }
        for entry in file.entries().iter().filter(|e| e.name != COMPRESSED) {
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
        let delta_tensors = if compression == Compression::None {
            tensors
        } else {
            0
        };
        if holds(Part::Delta) != delta_tensors {
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
            .map(|e| {
                let size = match e.dtype {
                    Dtype::U8 => 1,
                    dtype => TensorDtype::of(dtype).map_or(4, TensorDtype::size),
                };
                (e.len() * size) as u64
            })
            .sum();
        let meta = read_meta(file.metadata(), has_control, value_bytes, compression)?;
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

/// The encoding a file's delta is compressed with (`None` for a delta of tensors), its
/// tensor checked to hold exactly that encoding's bytes for the model `layout`.
fn compression_of<R: Read + Seek>(
    file: &TensorReader<R>,
    layout: &ModelLayout,
) -> Result<Compression, CoreError> {
    let compression = match file.metadata().get(COMPRESSION) {
        Some(name) => name.parse::<Compression>()?,
        None => Compression::None,
    };
    let entry = file.entry(COMPRESSED);
    match (compression, entry) {
        (Compression::None, None) => Ok(compression),
        (Compression::None, Some(_)) => Err(CoreError::LayoutMismatch(format!(
            "update holds '{COMPRESSED}' but its metadata names no '{COMPRESSION}'"
        ))),
        (_, None) => Err(CoreError::LayoutMismatch(format!(
            "update says its delta is {compression}-compressed but holds no '{COMPRESSED}'"
        ))),
        (_, Some(entry)) => {
            let expected = compression.wire_bytes(layout.num_params());
            if entry.dtype != Dtype::U8 || entry.shape != [expected as usize] {
                return Err(CoreError::Compression(format!(
                    "a {compression} delta of the model's {} values is {expected} bytes (u8); \
                     '{COMPRESSED}' is {:?} of shape {:?}",
                    layout.num_params(),
                    entry.dtype,
                    entry.shape
                )));
            }
            Ok(compression)
        }
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
        if part == Part::Delta && self.meta.compression != Compression::None {
            // The encoding is a fraction of the model's size; it is decoded whole, then
            // visited a tensor at a time like any other delta.
            let bytes = self.file.read_bytes(COMPRESSED)?;
            let dim = self.tensors.last().map_or(0, |(_, r)| r.end);
            let values = self.meta.compression.decode(&bytes, dim)?;
            for (_, range) in &self.tensors {
                visit(range.start, &values[range.clone()])?;
            }
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

/// Reads an update file written by [`encode_update`] (or any writer of the same tensors) for
/// the model `layout`. Values are not checked for NaN here; the aggregator does that.
pub fn decode_update(bytes: &[u8], layout: &ModelLayout) -> Result<Update, CoreError> {
    UpdateFile::open(std::io::Cursor::new(bytes), layout)?.read_whole()
}
