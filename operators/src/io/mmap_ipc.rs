//! Writing Arrow IPC working files and reading them back zero-copy through `mmap`.
//!
//! Files are written uncompressed with 64-byte alignment, so decoded buffers point straight
//! into the mapping (`FileDecoder::with_require_alignment`). A matrix is stored as one column
//! `v: FixedSizeList<Float32, p>`; each record batch is one contiguous row-major block.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array, RecordBatch};
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};
use datafusion::arrow::ipc::convert::fb_to_schema;
use datafusion::arrow::ipc::reader::{FileDecoder, read_footer_length};
use datafusion::arrow::ipc::writer::{FileWriter, IpcWriteOptions};
use datafusion::arrow::ipc::{MetadataVersion, root_as_footer};

use crate::error::{OperatorError, Result};
use crate::kernels::landmark::RowBlocks;

fn write_options() -> Result<IpcWriteOptions> {
    Ok(IpcWriteOptions::try_new(64, false, MetadataVersion::V5)?)
}

/// Schema of a matrix working file with `p` columns.
pub fn matrix_schema(p: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "v",
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float32, false)),
            p as i32,
        ),
        false,
    )]))
}

/// Appends row-major `f32` blocks to an Arrow IPC matrix file.
pub struct MatrixWriter {
    writer: FileWriter<BufWriter<File>>,
    schema: SchemaRef,
    p: usize,
    rows: usize,
}

impl MatrixWriter {
    /// Creates (truncates) `path` for a matrix with `p` columns.
    pub fn create(path: &Path, p: usize) -> Result<Self> {
        let schema = matrix_schema(p);
        let file = BufWriter::with_capacity(1 << 20, File::create(path)?);
        let writer = FileWriter::try_new_with_options(file, &schema, write_options()?)?;
        Ok(Self {
            writer,
            schema,
            p,
            rows: 0,
        })
    }

    /// Appends `rows.len() / p` rows.
    pub fn append(&mut self, rows: Vec<f32>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len() / self.p.max(1);
        let values = Float32Array::from(rows);
        let field = Arc::new(Field::new("item", DataType::Float32, false));
        let list = FixedSizeListArray::try_new(field, self.p as i32, Arc::new(values), None)?;
        let batch = RecordBatch::try_new(self.schema.clone(), vec![Arc::new(list)])?;
        self.writer.write(&batch)?;
        self.rows += n;
        Ok(())
    }

    /// Number of rows written.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Writes the footer and flushes.
    pub fn finish(mut self) -> Result<()> {
        self.writer.finish()?;
        Ok(())
    }
}

/// Writes record batches (any schema) to an Arrow IPC working file.
pub struct BatchWriter {
    writer: FileWriter<BufWriter<File>>,
}

impl BatchWriter {
    /// Creates (truncates) `path` for batches of `schema`.
    pub fn create(path: &Path, schema: &Schema) -> Result<Self> {
        let file = BufWriter::with_capacity(1 << 20, File::create(path)?);
        Ok(Self {
            writer: FileWriter::try_new_with_options(file, schema, write_options()?)?,
        })
    }

    /// Appends one batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch)?;
        Ok(())
    }

    /// Writes the footer and flushes.
    pub fn finish(mut self) -> Result<()> {
        self.writer.finish()?;
        Ok(())
    }
}

/// A memory-mapped Arrow IPC file whose record batches point into the mapping.
#[derive(Debug, Clone)]
pub struct MappedIpcFile {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl MappedIpcFile {
    /// Maps `path` and decodes its record batches without copying their buffers.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the working files are private to this run (created in its own temporary
        // directory) and never modified after `finish`.
        let mmap = unsafe { memmap2::Mmap::map(&file)? };
        let bytes = bytes::Bytes::from_owner(mmap);
        let buffer = Buffer::from(bytes);
        if buffer.len() < 10 {
            return Err(OperatorError::BadInput(format!(
                "{} is not an Arrow IPC file",
                path.display()
            )));
        }
        let trailer_start = buffer.len() - 10;
        let footer_len = read_footer_length(buffer[trailer_start..].try_into().expect("10 bytes"))?;
        let footer = root_as_footer(&buffer[trailer_start - footer_len..trailer_start])
            .map_err(|e| OperatorError::BadInput(format!("invalid IPC footer: {e}")))?;
        let schema =
            Arc::new(fb_to_schema(footer.schema().ok_or_else(|| {
                OperatorError::BadInput("IPC file without schema".into())
            })?));
        let mut decoder =
            FileDecoder::new(schema.clone(), footer.version()).with_require_alignment(true);
        for block in footer.dictionaries().iter().flatten() {
            let len = block.bodyLength() as usize + block.metaDataLength() as usize;
            let data = buffer.slice_with_length(block.offset() as usize, len);
            decoder.read_dictionary(block, &data)?;
        }
        let mut batches = Vec::new();
        for block in footer.recordBatches().iter().flatten() {
            let len = block.bodyLength() as usize + block.metaDataLength() as usize;
            let data = buffer.slice_with_length(block.offset() as usize, len);
            if let Some(batch) = decoder.read_record_batch(block, &data)? {
                batches.push(batch);
            }
        }
        Ok(Self { schema, batches })
    }

    /// The file's schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The record batches, in file order.
    pub fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// The row-major blocks of a matrix file (column 0 is `FixedSizeList<Float32, p>`).
    pub fn matrix_blocks(&self) -> Result<(usize, Vec<&[f32]>)> {
        let p = match self.schema.field(0).data_type() {
            DataType::FixedSizeList(_, p) => *p as usize,
            other => {
                return Err(OperatorError::BadInput(format!(
                    "not a matrix file: {other}"
                )));
            }
        };
        let blocks = self
            .batches
            .iter()
            .map(|b| {
                let list = b.column(0).as_fixed_size_list();
                let values = list.values().as_primitive::<Float32Type>();
                let off = list.offset() * p;
                &values.values()[off..off + list.len() * p]
            })
            .collect();
        Ok((p, blocks))
    }

    /// A [`RowBlocks`] view of a matrix file.
    pub fn row_blocks(&self) -> Result<RowBlocks<'_>> {
        let (p, blocks) = self.matrix_blocks()?;
        Ok(RowBlocks::new(blocks, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_round_trip_is_zero_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.arrow");
        let mut w = MatrixWriter::create(&path, 3).unwrap();
        w.append((0..30).map(|v| v as f32).collect()).unwrap();
        w.append((30..36).map(|v| v as f32).collect()).unwrap();
        assert_eq!(w.rows(), 12);
        w.finish().unwrap();
        let f = MappedIpcFile::open(&path).unwrap();
        assert_eq!(f.num_rows(), 12);
        let rb = f.row_blocks().unwrap();
        assert_eq!(rb.n(), 12);
        assert_eq!(rb.row(10), &[30.0, 31.0, 32.0]);
        // The decoded values live inside the file mapping, not on the heap.
        let (_, blocks) = f.matrix_blocks().unwrap();
        assert_eq!(blocks[0].as_ptr() as usize % 4, 0);
        assert_eq!(blocks.len(), 2);
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.arrow");
        std::fs::write(&path, b"not an arrow file at all").unwrap();
        assert!(MappedIpcFile::open(&path).is_err());
    }
}
