//! `balans sql`: statements in order, the last result printed or written atomically, and the
//! failing statement named.

mod common;

use common::{
    arg, assert_fails_with, assert_fails_writing_nothing, assert_ok, assert_stderr_has, balans,
    create_p, example_path, read, sql_to,
};

#[test]
fn prints_or_writes_the_last_result() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{}; SELECT Metadata_Batch, count(*) AS wells FROM p GROUP BY Metadata_Batch ORDER BY 1",
        create_p(&example_path())
    );
    let o = balans(&["sql", &script, "--max-rows", "3"]);
    assert_ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("| Week1          | 93    |"), "{stdout}");
    assert!(stdout.contains("(10 rows, first 3 shown"), "{stdout}");

    let out = dir.path().join("counts.parquet");
    let file = dir.path().join("script.sql");
    std::fs::write(&file, format!("-- per-batch well counts\n{script};\n")).unwrap();
    assert_ok(&balans(&[
        "sql",
        "--file",
        arg(&file),
        "--output",
        arg(&out),
    ]));
    assert_eq!(read(&out).num_rows(), 10);
    // An existing output needs --overwrite.
    assert!(!sql_to(&script, &out).status.success());
}

#[test]
fn a_failing_statement_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.parquet");
    let script = format!("{}; SELECT nope FROM p", create_p(&example_path()));
    let o = sql_to(&script, &out);
    assert_fails_writing_nothing(&o, "statement 2 of 2", &out);
    assert_stderr_has(&o, "nope");
    let o = balans(&["sql", "--output", arg(&out)]);
    assert_fails_with(&o, "--output needs the statements");
}

#[test]
fn statements_from_standard_input_run_one_by_one_and_are_kept_in_the_history() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    let script = format!(
        "{};\nSELECT count(*) AS wells\n  FROM p;\nSELECT nope FROM p;\nSELECT 41 + 1 AS answer;\n",
        create_p(&example_path())
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_balans"))
        .args(["--quiet", "sql"])
        .env("BALANS_HISTORY", &history)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    // Every statement ran; the failing one is reported and the next still runs.
    assert!(
        stdout.contains("| 632   |") && stdout.contains("| 42     |"),
        "{stdout}"
    );
    assert!(stderr.contains("nope"), "{stderr}");
    assert!(
        !o.status.success(),
        "a failed statement makes piped input fail"
    );
    let kept = std::fs::read_to_string(&history).unwrap();
    assert_eq!(kept.lines().count(), 4, "{kept}");
    assert!(
        kept.contains("SELECT count(*) AS wells   FROM p;"),
        "{kept}"
    );
}

/// On a terminal (a pseudo-terminal here) the shell edits lines and recalls earlier
/// statements with the arrow keys, Ctrl-C abandons a statement and Ctrl-D ends the session.
#[test]
fn the_terminal_shell_edits_and_recalls_statements() {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    std::fs::write(&history, "SELECT 'from an earlier session' AS earlier;\n").unwrap();
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors, which are owned below.
    let opened = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(opened, 0, "openpty failed");
    // SAFETY: fresh descriptors from openpty, each owned once.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let child = Command::new(env!("CARGO_BIN_EXE_balans"))
        .args(["--quiet", "sql"])
        .env("BALANS_HISTORY", &history)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut keys = File::from(master.try_clone().unwrap());
    // The terminal side, read on a thread; each step waits for the next prompt so that keys
    // arrive while the editor has the terminal in raw mode.
    let (sender, screen) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut terminal = File::from(master);
        let mut buffer = [0u8; 4096];
        while let Ok(n) = terminal.read(&mut buffer) {
            if n == 0 || sender.send(buffer[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut prompts = 0;
    let mut wait_for_prompt = |seen: &mut String| {
        prompts += 1;
        // A fresh prompt, not the editor's redraw of the line ("\rbalans> ...").
        let fresh = |s: &str| s.matches("balans> ").count() - s.matches("\rbalans> ").count();
        while fresh(seen) < prompts {
            let chunk = screen
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no prompt; the terminal shows: {seen}"));
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    wait_for_prompt(&mut seen);
    keys.write_all(b"SELECT 41 + 1 AS answer;\r").unwrap();
    wait_for_prompt(&mut seen);
    // ↑ recalls it; ← ← ← then Backspace and '2' edit "answer" into "ans2er".
    keys.write_all(b"\x1b[A\x1b[D\x1b[D\x1b[D\x7f2\r").unwrap();
    wait_for_prompt(&mut seen);
    // Two ↑ reach the previous session's statement; Home, Ctrl-K and new text replace it.
    keys.write_all(b"\x1b[A\x1b[A\x1b[A\x01\x0bSELECT 7 AS seven;\r")
        .unwrap();
    wait_for_prompt(&mut seen);
    keys.write_all(b"SELECT 'abandoned\x03").unwrap();
    wait_for_prompt(&mut seen);
    keys.write_all(b"\x04").unwrap();
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{seen}");
    assert!(
        stdout.contains("| answer |") && stdout.contains("| ans2er |"),
        "{stdout}"
    );
    assert!(stdout.contains("| seven |"), "{stdout}");
    assert!(!stdout.contains("abandoned"), "{stdout}");
    let kept = std::fs::read_to_string(&history).unwrap();
    assert_eq!(
        kept.lines().collect::<Vec<_>>(),
        vec![
            "SELECT 'from an earlier session' AS earlier;",
            "SELECT 41 + 1 AS answer;",
            "SELECT 41 + 1 AS ans2er;",
            "SELECT 7 AS seven;",
        ]
    );
}
