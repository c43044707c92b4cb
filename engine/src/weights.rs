//! Memory-mapped safetensors weights, single-file or sharded.
//!
//! The safetensors header is small (8-byte length + JSON), so we parse it ourselves: that
//! lets every error name the file and the tensor, and lets us check offsets before a
//! single weight byte is touched.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::backend::{DType, HostTensor};
use crate::config::read_json;
use crate::error::LoadError;

#[derive(Debug, Clone)]
struct TensorEntry {
    /// Err(name) for a dtype we do not compute with: refused only if asked for.
    dtype: Result<DType, String>,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorEntry>,
}

fn corrupt(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::CorruptHeader { path: path.to_owned(), message: message.into() }
}

/// The dtype and its element size; dtypes we do not compute with keep their name.
fn parse_dtype(name: &str) -> Option<(Result<DType, String>, usize)> {
    let computed = |d: DType| Some((Ok(d), d.size_in_bytes()));
    let stored = |size: usize| Some((Err(name.to_owned()), size));
    match name {
        "BF16" => computed(DType::BF16),
        "F16" => computed(DType::F16),
        "F32" => computed(DType::F32),
        "F64" | "I64" | "U64" => stored(8),
        "I32" | "U32" => stored(4),
        "I16" | "U16" => stored(2),
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => stored(1),
        _ => None,
    }
}

fn parse_entry(name: &str, v: &Value, data_start: usize, file_len: usize, path: &Path) -> Result<TensorEntry, LoadError> {
    let bad = |what: &str| corrupt(path, format!("tensor `{name}`: {what}"));
    let dtype_name = v.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("no dtype"))?;
    let (dtype, elem_size) = parse_dtype(dtype_name).ok_or_else(|| bad(&format!("unknown dtype {dtype_name}")))?;
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("shape is not a list of integers"))?;
    let offsets = v.get("data_offsets").and_then(Value::as_array).ok_or_else(|| bad("no data_offsets"))?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => (b.as_u64().ok_or_else(|| bad("bad offset"))? as usize, e.as_u64().ok_or_else(|| bad("bad offset"))? as usize),
        _ => return Err(bad("data_offsets must have two entries")),
    };
    let expected = shape.iter().product::<usize>() * elem_size;
    if end < begin || end - begin != expected {
        return Err(bad(&format!("data_offsets [{begin}, {end}] do not match shape {shape:?} of {dtype_name}")));
    }
    if data_start + end > file_len {
        return Err(bad(&format!("data ends at byte {} beyond the file's {file_len} bytes", data_start + end)));
    }
    Ok(TensorEntry { dtype, shape, start: data_start + begin, end: data_start + end })
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|source| LoadError::Io { path: path.to_owned(), source })?;
        // SAFETY: the file is opened read-only; we never write through the map. A file
        // truncated under us would fault, which is the accepted risk of mapping weights.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| LoadError::Io { path: path.to_owned(), source })?;
        if mmap.len() < 8 {
            return Err(corrupt(path, format!("file is {} bytes, shorter than the 8-byte header length", mmap.len())));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        if header_len > mmap.len() - 8 {
            return Err(corrupt(path, format!("header length {header_len} exceeds the file size {}", mmap.len())));
        }
        let header: Value = serde_json::from_slice(&mmap[8..8 + header_len])
            .map_err(|e| corrupt(path, format!("header is not valid JSON: {e}")))?;
        let obj = header.as_object().ok_or_else(|| corrupt(path, "header is not a JSON object"))?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::with_capacity(obj.len());
        for (name, v) in obj.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
            tensors.insert(name.clone(), parse_entry(name, v, data_start, mmap.len(), path)?);
        }
        Ok(Self { path: path.to_owned(), mmap, tensors })
    }
}

/// All weights of a model directory.
pub struct Weights {
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    location: HashMap<String, usize>,
}

fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| LoadError::Invalid { path: index.clone(), message: "`weight_map` is missing".into() })?;
        let files: BTreeMap<&str, ()> = map.values().filter_map(Value::as_str).map(|f| (f, ())).collect();
        return Ok(files.keys().map(|f| dir.join(f)).collect());
    }
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io { path: dir.to_owned(), source })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(LoadError::Invalid { path: dir.to_owned(), message: "no *.safetensors files found".into() });
    }
    Ok(paths)
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let files = shard_paths(dir)?.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>, _>>()?;
        let mut location = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors.keys() {
                location.insert(name.clone(), i);
            }
        }
        Ok(Self { files, location })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn looked_in(&self) -> String {
        self.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// A tensor by name, borrowed from the mapped file.
    pub fn get(&self, name: &str) -> Result<HostTensor<'_>, LoadError> {
        let file = self
            .location
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| LoadError::MissingTensor { tensor: name.to_owned(), looked_in: self.looked_in() })?;
        let e = &file.tensors[name];
        let dtype = e.dtype.clone().map_err(|dtype| LoadError::UnsupportedDtype {
            tensor: name.to_owned(),
            path: file.path.clone(),
            dtype,
        })?;
        Ok(HostTensor { dtype, shape: e.shape.clone(), bytes: Cow::Borrowed(&file.mmap[e.start..e.end]) })
    }

    /// A tensor that must have exactly `expected` shape.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<HostTensor<'_>, LoadError> {
        let t = self.get(name)?;
        if t.shape != expected {
            let path = self.files[self.location[name]].path.clone();
            return Err(LoadError::WrongShape {
                tensor: name.to_owned(),
                path,
                expected: expected.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dlengine-weights-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_a_tensor_and_checks_its_shape() {
        let dir = temp_dir("ok");
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        write_file(&dir, "model.safetensors", r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#, &data);
        let w = Weights::open(&dir).unwrap();
        assert_eq!(w.get("w").unwrap().to_f32(), vec![1.0, 2.0, 3.0, 4.0]);
        let err = w.get_shaped("w", &[4, 1]).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("[4, 1]") && err.contains("[2, 2]"), "{err}");
        let err = w.get("missing.weight").unwrap_err().to_string();
        assert!(err.contains("missing.weight") && err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn corrupt_headers_name_the_file() {
        let dir = temp_dir("bad");
        write_file(&dir, "a.safetensors", "{not json", &[]);
        let err = Weights::open(&dir).err().unwrap().to_string();
        assert!(err.contains("a.safetensors") && err.contains("JSON"), "{err}");

        let dir = temp_dir("short");
        write_file(&dir, "b.safetensors", r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0; 8]);
        let err = Weights::open(&dir).err().unwrap().to_string();
        assert!(err.contains("b.safetensors") && err.contains("`w`"), "{err}");

        let dir = temp_dir("dtype");
        write_file(&dir, "c.safetensors", r#"{"w":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}}"#, &[0]);
        let err = Weights::open(&dir).unwrap().get("w").err().unwrap().to_string();
        assert!(err.contains("I8") && err.contains("`w`") && err.contains("c.safetensors"), "{err}");
    }
}
