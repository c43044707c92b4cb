//! A tensor as read from disk: dtype, shape and raw little-endian bytes.

use std::borrow::Cow;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HostTensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> HostTensor<'a> {
    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> HostTensor<'static> {
        HostTensor { dtype: DType::F32, shape, bytes: Cow::Owned(bytemuck::cast_slice(data).to_vec()) }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows and columns, treating a 1-D tensor as one row.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => (self.shape[..self.shape.len() - 1].iter().product(), *self.shape.last().unwrap_or(&1)),
        }
    }

    /// Values converted to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let b = &self.bytes[..];
        match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }

    /// Values converted to bf16 (for backends that store bf16).
    pub fn to_bf16(&self) -> Vec<bf16> {
        match self.dtype {
            DType::BF16 => self.bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect(),
            _ => self.to_f32().into_iter().map(bf16::from_f32).collect(),
        }
    }

    /// Stacks tensors with equal column counts along rows (fusing q/k/v or gate/up
    /// projections into one matrix). Mixed dtypes are widened to f32.
    pub fn concat_rows(parts: &[HostTensor<'_>]) -> HostTensor<'static> {
        let cols = parts[0].rows_cols().1;
        let rows: usize = parts.iter().map(|p| p.rows_cols().0).sum();
        let dtype = parts[0].dtype;
        if parts.iter().all(|p| p.dtype == dtype) {
            let bytes: Vec<u8> = parts.iter().flat_map(|p| p.bytes.iter().copied()).collect();
            HostTensor { dtype, shape: vec![rows, cols], bytes: Cow::Owned(bytes) }
        } else {
            let data: Vec<f32> = parts.iter().flat_map(|p| p.to_f32()).collect();
            HostTensor::from_f32(vec![rows, cols], &data)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_each_dtype_to_f32() {
        let vals = [1.5f32, -2.25, 0.0];
        let bf: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let hf: Vec<u8> = vals.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        for (dtype, bytes) in [(DType::BF16, bf), (DType::F16, hf)] {
            let t = HostTensor { dtype, shape: vec![3], bytes: Cow::Owned(bytes) };
            assert_eq!(t.to_f32(), vals);
        }
        assert_eq!(HostTensor::from_f32(vec![3], &vals).to_f32(), vals);
    }

    #[test]
    fn concat_rows_stacks_and_widens_mixed_dtypes() {
        let a = HostTensor::from_f32(vec![1, 2], &[1.0, 2.0]);
        let b_bytes: Vec<u8> = [3.0f32, 4.0].iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let b = HostTensor { dtype: DType::BF16, shape: vec![1, 2], bytes: Cow::Owned(b_bytes) };
        let c = HostTensor::concat_rows(&[a, b]);
        assert_eq!(c.shape, vec![2, 2]);
        assert_eq!(c.to_f32(), vec![1.0, 2.0, 3.0, 4.0]);
    }
}
