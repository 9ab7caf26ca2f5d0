//! The golden readers themselves: shapes as the golden README states them.
mod common;

#[test]
fn golden_embeddings_have_the_documented_shapes() {
    let b = common::load("bbbc021_combat");
    assert_eq!((b.n_rows, b.d, b.cell_rows.len()), (632, 248, 302));
    let s = common::load("synthetic_raw");
    assert_eq!((s.n_rows, s.d, s.cell_rows.len()), (3000, 20, 2700));
    let per_cell = common::read_parquet(&common::golden("synthetic_raw", "per_cell.parquet"));
    let rows = common::col_i64(&per_cell, "row");
    let expected: Vec<i64> = s.cell_rows.iter().map(|&r| r as i64).collect();
    assert_eq!(rows, expected);
}
