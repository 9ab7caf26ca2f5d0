//! Arrow data across the boundary: the PyCapsule C stream interface in both directions.
//!
//! Import: `obj.__arrow_c_stream__()` gives a capsule named `arrow_array_stream` holding an
//! `FFI_ArrowArrayStream`; its batches are read into Rust without copying buffers (they stay
//! owned by the producer and are released through the C interface). View types (polars) and
//! dictionary-encoded columns (pandas categoricals) are cast to plain types, the other columns
//! pass through untouched. Export: [`ArrowStream`] implements `__arrow_c_stream__`, so
//! `pyarrow.table(obj)` takes the batches over without copying.

use std::ffi::CStr;
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, RecordBatchIterator, RecordBatchReader};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ffi_stream::{ArrowArrayStreamReader, FFI_ArrowArrayStream};
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use crate::error::{Error, Result};

/// Name of the capsule of the Arrow C stream interface.
const STREAM_CAPSULE: &CStr = c"arrow_array_stream";

/// Reads every batch of an object implementing `__arrow_c_stream__` (zero copy).
pub fn import_stream(obj: &Bound<'_, PyAny>) -> PyResult<(SchemaRef, Vec<RecordBatch>)> {
    let capsule = obj.call_method1("__arrow_c_stream__", (obj.py().None(),))?;
    let capsule = capsule.cast_into::<PyCapsule>()?;
    let pointer = capsule.pointer_checked(Some(STREAM_CAPSULE))?;
    // SAFETY: the capsule is named `arrow_array_stream`, so by the PyCapsule interface it
    // holds a valid `FFI_ArrowArrayStream`; `from_raw` moves it out and leaves a released
    // stream behind, which the capsule's destructor then ignores.
    let reader = unsafe { ArrowArrayStreamReader::from_raw(pointer.as_ptr().cast()) }
        .map_err(Error::from)?;
    let (schema, casts) = plain_schema(&reader.schema());
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(Error::from)?;
        batches.push(if casts {
            plain_batch(&schema, &batch)?
        } else {
            batch
        });
    }
    Ok((schema, batches))
}

/// The type a column is cast to on import, if any.
fn plain_type(data_type: &DataType) -> Option<DataType> {
    match data_type {
        DataType::Utf8View => Some(DataType::Utf8),
        DataType::BinaryView => Some(DataType::Binary),
        DataType::Dictionary(_, value) => Some(plain_type(value).unwrap_or((**value).clone())),
        _ => None,
    }
}

fn plain_schema(schema: &SchemaRef) -> (SchemaRef, bool) {
    let mut changed = false;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match plain_type(f.data_type()) {
            Some(t) => {
                changed = true;
                f.as_ref().clone().with_data_type(t)
            }
            None => f.as_ref().clone(),
        })
        .collect();
    (
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        changed,
    )
}

fn plain_batch(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                cast(c, f.data_type())
            }
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// A result table exported through the Arrow C stream interface (once).
#[pyclass(module = "balans._balans", frozen)]
pub struct ArrowStream {
    data: std::sync::Mutex<Option<(SchemaRef, Vec<RecordBatch>)>>,
}

impl ArrowStream {
    /// Wraps `batches` of `schema`.
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        Self {
            data: std::sync::Mutex::new(Some((schema, batches))),
        }
    }
}

#[pymethods]
impl ArrowStream {
    /// Exports the batches as an `arrow_array_stream` capsule (the PyCapsule interface).
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        // The schema is given as is; consumers cast if they asked for another.
        let _ = requested_schema;
        let (schema, batches) = self
            .data
            .lock()
            .map_err(|_| Error::invalid("the result stream is poisoned"))?
            .take()
            .ok_or_else(|| Error::invalid("the result stream was already consumed"))?;
        let reader: Box<dyn RecordBatchReader + Send> = Box::new(RecordBatchIterator::new(
            batches.into_iter().map(Ok),
            schema,
        ));
        PyCapsule::new_with_value(py, FFI_ArrowArrayStream::new(reader), STREAM_CAPSULE)
    }
}
