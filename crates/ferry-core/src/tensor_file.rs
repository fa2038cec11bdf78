//! Safetensors files read and written a piece at a time, so that a model or an update of
//! gigabytes passes through a process without being held whole next to its decoded values.
//!
//! [`TensorReader`] reads the header of any `Read + Seek` source (a file, or bytes in memory),
//! refusing a header that claims more than the source holds before allocating anything, and
//! then hands out one tensor at a time in pieces. [`header`] writes the header the
//! `safetensors` crate writes for the same tensors, so a file written in pieces is
//! byte-identical to one serialised whole.

use std::{
    collections::HashMap,
    io::{Read, Seek, SeekFrom},
    ops::Range,
};

use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use crate::{CoreError, TensorDtype};

/// The largest header accepted (the `safetensors` crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Values decoded per piece: 256 Ki values, 1 MiB of f32.
const PIECE_VALUES: usize = 1 << 18;

fn format_error(detail: impl std::fmt::Display) -> CoreError {
    CoreError::Safetensors(detail.to_string())
}

fn io_error(e: std::io::Error) -> CoreError {
    CoreError::Io(e.to_string())
}

/// What receives a tensor's values a piece at a time: `(index of the piece's first value,
/// the values)`.
pub type Visit<'a> = dyn FnMut(usize, &[f32]) -> Result<(), CoreError> + 'a;

/// One tensor as the header lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// How its values are stored.
    pub dtype: Dtype,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Where its bytes lie, counted from the start of the data section.
    pub bytes: Range<u64>,
}

impl Entry {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A safetensors file whose header has been read and checked against the source's length;
/// its tensors are read on demand.
#[derive(Debug)]
pub struct TensorReader<R> {
    source: R,
    entries: Vec<Entry>,
    metadata: HashMap<String, String>,
    data_start: u64,
}

impl<R: Read + Seek> TensorReader<R> {
    /// Reads and checks the header of `source`.
    pub fn open(mut source: R) -> Result<Self, CoreError> {
        let len = source.seek(SeekFrom::End(0)).map_err(io_error)?;
        source.seek(SeekFrom::Start(0)).map_err(io_error)?;
        if len < 8 {
            return Err(format_error(format!(
                "{len} bytes is too short for a safetensors file (it starts with an 8-byte header length)"
            )));
        }
        let mut n = [0u8; 8];
        source.read_exact(&mut n).map_err(io_error)?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n > len - 8 {
            return Err(format_error(format!(
                "the header claims {n} bytes but the file holds {len} (at most {MAX_HEADER_BYTES} \
                 are accepted)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        source.read_exact(&mut header).map_err(io_error)?;
        let parsed: Metadata = serde_json::from_slice(&header).map_err(format_error)?;
        let data_start = 8 + n;
        if data_start + parsed.data_len() as u64 != len {
            return Err(format_error(format!(
                "the header describes {} data bytes but the file holds {}",
                parsed.data_len(),
                len - data_start
            )));
        }
        let entries = parsed
            .offset_keys()
            .into_iter()
            .filter_map(|name| {
                let info = parsed.info(&name)?;
                Some(Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: info.data_offsets.0 as u64..info.data_offsets.1 as u64,
                    name,
                })
            })
            .collect();
        Ok(Self {
            source,
            entries,
            metadata: parsed.metadata().clone().unwrap_or_default(),
            data_start,
        })
    }

    /// The tensors, in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The tensor called `name`.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The file's string metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    fn seek_to(&mut self, entry: &Entry, value: usize, width: usize) -> Result<(), CoreError> {
        let at = self.data_start + entry.bytes.start + (value * width) as u64;
        self.source.seek(SeekFrom::Start(at)).map_err(io_error)?;
        Ok(())
    }

    /// The raw bytes of tensor `name` (for tensors carried as they are).
    pub fn read_bytes(&mut self, name: &str) -> Result<Vec<u8>, CoreError> {
        let entry = self.required(name)?;
        self.seek_to(&entry, 0, 1)?;
        let mut bytes = vec![0u8; (entry.bytes.end - entry.bytes.start) as usize];
        self.source.read_exact(&mut bytes).map_err(io_error)?;
        Ok(bytes)
    }

    fn required(&self, name: &str) -> Result<Entry, CoreError> {
        self.entry(name)
            .cloned()
            .ok_or_else(|| format_error(format!("the file has no tensor '{name}'")))
    }

    /// Reads floating-point tensor `name` a piece at a time, decoded to f32, calling
    /// `visit(first_value_index, values)` for each piece in order.
    pub fn visit_f32(&mut self, name: &str, visit: &mut Visit<'_>) -> Result<(), CoreError> {
        let entry = self.required(name)?;
        let dtype = TensorDtype::of(entry.dtype).ok_or_else(|| CoreError::UnsupportedDtype {
            name: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        })?;
        let width = dtype.size();
        let total = entry.len();
        self.seek_to(&entry, 0, width)?;
        let mut raw = vec![0u8; PIECE_VALUES.min(total) * width];
        let mut values = Vec::with_capacity(PIECE_VALUES.min(total));
        let mut done = 0;
        while done < total {
            let count = PIECE_VALUES.min(total - done);
            let raw = &mut raw[..count * width];
            self.source.read_exact(raw).map_err(io_error)?;
            values.clear();
            dtype.decode_into(name, raw, &mut values)?;
            visit(done, &values)?;
            done += count;
        }
        Ok(())
    }

    /// Reads floating-point tensor `name` into `out`, which must be its length.
    pub fn read_f32_into(&mut self, name: &str, out: &mut [f32]) -> Result<(), CoreError> {
        let expected = out.len();
        self.visit_f32(name, &mut |at, values| {
            let target = out
                .get_mut(at..at + values.len())
                .ok_or(CoreError::LengthMismatch {
                    expected,
                    got: at + values.len(),
                })?;
            target.copy_from_slice(values);
            Ok(())
        })
    }
}

/// A tensor to be written: its name, dtype, shape, and byte length.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its name.
    pub name: String,
    /// How its values are stored.
    pub dtype: Dtype,
    /// Its dimensions.
    pub shape: Vec<usize>,
}

impl Planned {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// The file header (length prefix included) for `tensors`, and the order their data must
/// follow in: descending dtype alignment, then name, as the `safetensors` crate writes it.
pub fn header(
    tensors: &[Planned],
    metadata: Option<HashMap<String, String>>,
) -> Result<(Vec<u8>, Vec<usize>), CoreError> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&tensors[a], &tensors[b]);
        b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name))
    });
    let mut offset = 0;
    let infos = order
        .iter()
        .map(|&i| {
            let t = &tensors[i];
            let info = TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.byte_len()),
            };
            offset += t.byte_len();
            (t.name.clone(), info)
        })
        .collect();
    let parsed = Metadata::new(metadata, infos).map_err(format_error)?;
    let mut json = serde_json::to_string(&parsed)
        .map_err(format_error)?
        .into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    Ok((bytes, order))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use safetensors::tensor::TensorView;

    use super::*;

    fn file() -> Vec<u8> {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b: Vec<u8> = [4.0f64, 5.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "b".to_string(),
                TensorView::new(Dtype::F64, vec![2], &b).expect("view"),
            ),
            (
                "a".to_string(),
                TensorView::new(Dtype::F32, vec![3], &a).expect("view"),
            ),
        ];
        safetensors::serialize(views, Some(HashMap::from([("k".into(), "v".into())])))
            .expect("serialise")
    }

    #[test]
    fn tensors_are_read_in_pieces_and_decoded() {
        let mut reader = TensorReader::open(Cursor::new(file())).expect("open");
        assert_eq!(reader.metadata()["k"], "v");
        let names: Vec<_> = reader.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "a"], "file order: f64 before f32");
        let mut b = [0.0; 2];
        reader.read_f32_into("b", &mut b).expect("read b");
        assert_eq!(b, [4.0, 5.0]);
        let mut a = [0.0; 3];
        reader.read_f32_into("a", &mut a).expect("read a");
        assert_eq!(a, [1.0, 2.0, 3.0]);
        assert!(reader.read_f32_into("missing", &mut a).is_err());
    }

    #[test]
    fn the_written_header_is_the_one_safetensors_writes() {
        let bytes = file();
        let planned = [
            Planned {
                name: "a".into(),
                dtype: Dtype::F32,
                shape: vec![3],
            },
            Planned {
                name: "b".into(),
                dtype: Dtype::F64,
                shape: vec![2],
            },
        ];
        let (header, order) =
            header(&planned, Some(HashMap::from([("k".into(), "v".into())]))).expect("header");
        assert_eq!(order, [1, 0]);
        assert_eq!(&bytes[..header.len()], &header[..]);
    }

    #[test]
    fn a_header_claiming_more_than_the_file_allocates_nothing_and_is_refused() {
        for claimed in [u64::MAX, 4 << 30, 1000] {
            let mut bytes = claimed.to_le_bytes().to_vec();
            bytes.extend(b"{}");
            let error = TensorReader::open(Cursor::new(bytes)).expect_err("refused");
            assert!(error.to_string().contains("claims"), "{error}");
        }
        assert!(TensorReader::open(Cursor::new(vec![1, 2])).is_err());
        let mut truncated = file();
        truncated.pop();
        assert!(TensorReader::open(Cursor::new(truncated)).is_err());
    }
}
