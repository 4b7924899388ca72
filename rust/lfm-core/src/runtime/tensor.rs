//! Tensors in and out of ONNX Runtime. Graphs may take float inputs in fp32 or fp16; the
//! engine computes in fp32 and converts at the edge.

use half::f16;
use ort::value::{DynValue, Tensor, TensorElementType};

use crate::error::{Error, Result};

/// Element type of a floating-point graph edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
}

impl FloatType {
    pub fn from_ort(t: TensorElementType) -> Option<FloatType> {
        match t {
            TensorElementType::Float32 => Some(FloatType::F32),
            TensorElementType::Float16 => Some(FloatType::F16),
            _ => None,
        }
    }
}

fn ort_err(stage: &'static str) -> impl Fn(ort::Error) -> Error {
    move |e| Error::inference(stage, e)
}

/// A float tensor of `shape` holding `data`, in the element type the graph wants.
pub fn float_value(stage: &'static str, ty: FloatType, shape: &[usize], data: Vec<f32>) -> Result<DynValue> {
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Ok(match ty {
        FloatType::F32 => Tensor::from_array((shape, data)).map_err(ort_err(stage))?.into_dyn(),
        FloatType::F16 => {
            let half: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
            Tensor::from_array((shape, half)).map_err(ort_err(stage))?.into_dyn()
        }
    })
}

/// An int64 tensor of `shape`.
pub fn i64_value(stage: &'static str, shape: &[usize], data: Vec<i64>) -> Result<DynValue> {
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_array((shape, data)).map_err(ort_err(stage))?.into_dyn())
}

/// Shape and fp32 copy of the elements `range` (all when `None`) of a float output.
pub fn read_floats(
    stage: &'static str,
    value: &DynValue,
    range: Option<std::ops::Range<usize>>,
) -> Result<(Vec<i64>, Vec<f32>)> {
    let ty = value.dtype().tensor_type().and_then(FloatType::from_ort);
    let pick = |len: usize| range.clone().unwrap_or(0..len);
    match ty {
        Some(FloatType::F32) => {
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_err(stage))?;
            let r = pick(data.len());
            let slice = data
                .get(r.clone())
                .ok_or_else(|| Error::inference(stage, format!("output has {} elements, wanted {r:?}", data.len())))?;
            Ok((shape.to_vec(), slice.to_vec()))
        }
        Some(FloatType::F16) => {
            let (shape, data) = value.try_extract_tensor::<f16>().map_err(ort_err(stage))?;
            let r = pick(data.len());
            let slice = data
                .get(r.clone())
                .ok_or_else(|| Error::inference(stage, format!("output has {} elements, wanted {r:?}", data.len())))?;
            Ok((shape.to_vec(), slice.iter().map(|v| v.to_f32()).collect()))
        }
        None => Err(Error::inference(stage, format!("expected a float output, got {:?}", value.dtype()))),
    }
}

/// The actual dims of a float output (no copy).
pub fn float_dims(stage: &'static str, value: &DynValue) -> Result<Vec<i64>> {
    match value.dtype().tensor_type().and_then(FloatType::from_ort) {
        Some(FloatType::F32) => Ok(value.try_extract_tensor::<f32>().map_err(ort_err(stage))?.0.to_vec()),
        Some(FloatType::F16) => Ok(value.try_extract_tensor::<f16>().map_err(ort_err(stage))?.0.to_vec()),
        None => Err(Error::inference(stage, format!("expected a float output, got {:?}", value.dtype()))),
    }
}

/// Fails when any value is NaN or infinite: a broken graph or variant must not produce
/// text silently.
pub fn check_finite(stage: &'static str, data: &[f32]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::inference(stage, format!("non-finite value {} at index {i}", data[i]))),
    }
}
