//! Test helpers shared by the source modules' tests: small profile tables written as
//! Parquet, Arrow IPC and CSV files, and a session that would split scans if allowed.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, AsArray, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{SessionConfig, SessionContext};

pub(super) fn profile_batch(ids: &[i64]) -> RecordBatch {
    let n = ids.len();
    let plate: Vec<String> = ids.iter().map(|i| format!("P{}", i % 2)).collect();
    let batch: Vec<&str> = ids
        .iter()
        .map(|i| if *i <= 3 { "B1" } else { "B2" })
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("Metadata_Plate", DataType::Utf8, false),
        Field::new("Metadata_Batch", DataType::Utf8, false),
        Field::new("Metadata_Id", DataType::Int64, false),
        Field::new("Cells_A", DataType::Float64, true),
        Field::new("Cells_B", DataType::Int64, false),
        Field::new("Nuclei_C", DataType::Float32, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(plate)),
        Arc::new(StringArray::from(batch)),
        Arc::new(Int64Array::from(ids.to_vec())),
        Arc::new(Float64Array::from_iter_values(
            ids.iter().map(|&i| i as f64 * 0.5),
        )),
        Arc::new(Int64Array::from_iter_values(ids.iter().map(|&i| i * 10))),
        Arc::new(Float32Array::from(vec![1.0f32; n])),
    ];
    RecordBatch::try_new(schema, columns).unwrap()
}

pub(super) fn write_parquet(path: &Path, batch: &RecordBatch) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

pub(super) fn write_ipc(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = FileWriter::try_new(file, &batch.schema()).unwrap();
    writer.write(batch).unwrap();
    writer.finish().unwrap();
}

pub(super) const CSV: &str = "Metadata_Plate,Metadata_Batch,Cells_A,Cells_B\n\
                   P1,B1,1.5,1\n\
                   P1,B1,2.5,2\n\
                   P2,B2,3.5,3\n";

pub(super) fn write_csv_gz(path: &Path, text: &str) {
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap();
}

/// A session that would split scans if the table allowed it.
pub(super) fn parallel_context() -> SessionContext {
    let mut config = SessionConfig::new().with_target_partitions(8);
    config.options_mut().optimizer.repartition_file_min_size = 1;
    SessionContext::new_with_config(config)
}

pub(super) async fn column_i64(ctx: &SessionContext, sql: &str) -> Vec<i64> {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    batches
        .iter()
        .flat_map(|b| {
            let col = cast(b.column(0), &DataType::Int64).unwrap();
            col.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values()
                .to_vec()
        })
        .collect()
}

pub(super) fn path_str(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

pub(super) fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}
