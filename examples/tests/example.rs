//! The embedding example runs end to end on the bundled table: scores before and after, and
//! the corrected profiles written back.

use std::process::Command;

#[test]
fn example_corrects_scores_and_writes_back() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("corrected.parquet");
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/data/bbbc021.parquet");
    let o = Command::new(env!("CARGO_BIN_EXE_balans-examples"))
        .args([input, output.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for needle in ["batch_score", "bio_score", "overall", "| 632   |"] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    assert!(output.is_file());
}
