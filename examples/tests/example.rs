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

#[path = "../../engine/tests/common/seaweed.rs"]
mod seaweed;

/// An unsigned S3 `PUT` of `body` to `key` in the test bucket.
fn put_object(port: u16, key: &str, body: &[u8]) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "PUT /{}/{key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        seaweed::BUCKET,
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn example_reads_a_bucket_and_writes_back_partitioned() {
    let server = seaweed::Server::start();
    let data = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/data/bbbc021.parquet")).unwrap();
    put_object(
        server.s3_port,
        "source_1/workspace/profiles/all/all_plates/all_plates.parquet",
        &data,
    );
    let o = Command::new(env!("CARGO_BIN_EXE_balans-examples"))
        .args([
            &format!("s3://{}/source_1/workspace/profiles/", seaweed::BUCKET),
            &format!("s3://{}/corrected/", seaweed::BUCKET),
            &server.endpoint(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("overall") && stdout.contains("| 632   |"),
        "{stdout}"
    );
}
