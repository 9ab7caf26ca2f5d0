//! A small line editor for the `balans sql` shell: cursor movement, deletion and history
//! recall on a terminal in raw mode.
//!
//! The editing rules are a pure state machine ([`LineEditor`] over [`Key`]s decoded by
//! [`decode_keys`]), tested without a terminal; [`read_line`] is the thin terminal part (raw
//! mode through `termios`, restored on every exit path). Lines are edited on one screen row:
//! a line longer than the terminal is still edited correctly but redrawn from its wrapped
//! start.
//!
//! Keys: ←/→ (Ctrl-B/F) move, Home/End (Ctrl-A/E), Backspace, Delete, ↑/↓ (Ctrl-P/N) walk
//! the history, Ctrl-U deletes to the start, Ctrl-K to the end, Ctrl-W the word before the
//! cursor, Ctrl-C abandons the line, Ctrl-D on an empty line ends the input.

use std::io::{Read, Write};

/// One decoded key press.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// A printable character.
    Char(char),
    /// Enter.
    Enter,
    /// Backspace.
    Backspace,
    /// Delete (the character under the cursor).
    Delete,
    /// Cursor left.
    Left,
    /// Cursor right.
    Right,
    /// Line start.
    Home,
    /// Line end.
    End,
    /// Older history entry.
    Up,
    /// Newer history entry.
    Down,
    /// Delete to the line start (Ctrl-U).
    KillStart,
    /// Delete to the line end (Ctrl-K).
    KillEnd,
    /// Delete the word before the cursor (Ctrl-W).
    KillWord,
    /// Abandon the line (Ctrl-C).
    Interrupt,
    /// End of input on an empty line, else delete (Ctrl-D).
    EndOfInput,
    /// A key the editor ignores.
    Ignored,
}

/// Decodes the bytes a terminal sends in raw mode into keys. Returns the keys and how many
/// bytes were used: an incomplete escape sequence or UTF-8 character at the end is left for
/// the next read.
pub fn decode_keys(bytes: &[u8]) -> (Vec<Key>, usize) {
    let mut keys = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let (key, used) = match b {
            b'\r' | b'\n' => (Key::Enter, 1),
            0x7f | 0x08 => (Key::Backspace, 1),
            0x01 => (Key::Home, 1),
            0x05 => (Key::End, 1),
            0x02 => (Key::Left, 1),
            0x06 => (Key::Right, 1),
            0x10 => (Key::Up, 1),
            0x0e => (Key::Down, 1),
            0x15 => (Key::KillStart, 1),
            0x0b => (Key::KillEnd, 1),
            0x17 => (Key::KillWord, 1),
            0x03 => (Key::Interrupt, 1),
            0x04 => (Key::EndOfInput, 1),
            0x1b => {
                // ESC [ X, ESC O X, ESC [ n ~ (a lone ESC at the end waits for more bytes).
                let Some(&kind) = bytes.get(i + 1) else { break };
                if kind != b'[' && kind != b'O' {
                    (Key::Ignored, 1)
                } else {
                    let start = i + 2;
                    let Some(end) = bytes[start..]
                        .iter()
                        .position(|c| (0x40..=0x7e).contains(c))
                        .map(|p| start + p)
                    else {
                        break;
                    };
                    let key = match (&bytes[start..end], bytes[end]) {
                        (_, b'A') => Key::Up,
                        (_, b'B') => Key::Down,
                        (_, b'C') => Key::Right,
                        (_, b'D') => Key::Left,
                        (_, b'H') => Key::Home,
                        (_, b'F') => Key::End,
                        (b"1" | b"7", b'~') => Key::Home,
                        (b"4" | b"8", b'~') => Key::End,
                        (b"3", b'~') => Key::Delete,
                        _ => Key::Ignored,
                    };
                    (key, end + 1 - i)
                }
            }
            c if c < 0x20 => (Key::Ignored, 1),
            _ => {
                let width = match b {
                    0xc0..=0xdf => 2,
                    0xe0..=0xef => 3,
                    0xf0..=0xf7 => 4,
                    _ => 1,
                };
                if i + width > bytes.len() {
                    break;
                }
                match std::str::from_utf8(&bytes[i..i + width]) {
                    Ok(s) => (Key::Char(s.chars().next().expect("one char")), width),
                    Err(_) => (Key::Ignored, 1),
                }
            }
        };
        keys.push(key);
        i += used;
    }
    (keys, i)
}

/// What a key did to the line being edited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Keep editing (redraw).
    Editing,
    /// The line is done.
    Done(String),
    /// The line was abandoned (Ctrl-C).
    Interrupted,
    /// The input ended (Ctrl-D on an empty line).
    EndOfInput,
}

/// The editing state of one line, with the history to recall from.
#[derive(Debug, Clone)]
pub struct LineEditor<'h> {
    line: Vec<char>,
    cursor: usize,
    history: &'h [String],
    /// Position in the history: `history.len()` is the line being typed.
    recall: usize,
    /// The line being typed, kept while the history is shown.
    draft: Vec<char>,
}

impl<'h> LineEditor<'h> {
    /// An empty line; `history` is oldest first.
    pub fn new(history: &'h [String]) -> Self {
        Self {
            line: Vec::new(),
            cursor: 0,
            history,
            recall: history.len(),
            draft: Vec::new(),
        }
    }

    /// The current text.
    pub fn text(&self) -> String {
        self.line.iter().collect()
    }

    /// The cursor position, in characters.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    fn show(&mut self, entry: usize) {
        if self.recall == self.history.len() {
            self.draft = self.line.clone();
        }
        self.recall = entry;
        self.line = if entry == self.history.len() {
            self.draft.clone()
        } else {
            self.history[entry].chars().collect()
        };
        self.cursor = self.line.len();
    }

    /// Applies one key.
    pub fn apply(&mut self, key: Key) -> Outcome {
        match key {
            Key::Char(c) => {
                self.line.insert(self.cursor, c);
                self.cursor += 1;
            }
            Key::Enter => return Outcome::Done(self.text()),
            Key::Backspace if self.cursor > 0 => {
                self.cursor -= 1;
                self.line.remove(self.cursor);
            }
            Key::Delete if self.cursor < self.line.len() => {
                self.line.remove(self.cursor);
            }
            Key::EndOfInput if self.line.is_empty() => return Outcome::EndOfInput,
            Key::EndOfInput => return self.apply(Key::Delete),
            Key::Left => self.cursor = self.cursor.saturating_sub(1),
            Key::Right => self.cursor = (self.cursor + 1).min(self.line.len()),
            Key::Home => self.cursor = 0,
            Key::End => self.cursor = self.line.len(),
            Key::Up if self.recall > 0 => self.show(self.recall - 1),
            Key::Down if self.recall < self.history.len() => self.show(self.recall + 1),
            Key::KillStart => {
                self.line.drain(..self.cursor);
                self.cursor = 0;
            }
            Key::KillEnd => self.line.truncate(self.cursor),
            Key::KillWord => {
                let mut start = self.cursor;
                while start > 0 && self.line[start - 1].is_whitespace() {
                    start -= 1;
                }
                while start > 0 && !self.line[start - 1].is_whitespace() {
                    start -= 1;
                }
                self.line.drain(start..self.cursor);
                self.cursor = start;
            }
            Key::Interrupt => return Outcome::Interrupted,
            _ => {}
        }
        Outcome::Editing
    }
}

/// Puts the terminal on `fd` in raw mode until dropped.
struct RawMode {
    fd: libc::c_int,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: libc::c_int) -> std::io::Result<Self> {
        // SAFETY: `termios` is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is an open descriptor and `saved` a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // No echo, byte at a time, no signals from Ctrl-C (the editor handles it), no CR/NL
        // translation on input; output processing stays on so "\n" still starts a line.
        raw.c_lflag &= !(libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::ISTRIP);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter` on the same descriptor.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved);
        }
    }
}

/// Reads one line from the terminal on standard input with editing and history recall,
/// drawing `prompt` and the line on `out`: [`Outcome::Done`] with the line,
/// [`Outcome::Interrupted`] (Ctrl-C) or [`Outcome::EndOfInput`] (Ctrl-D on an empty line, or
/// a closed terminal).
pub fn read_line(
    prompt: &str,
    history: &[String],
    out: &mut dyn Write,
) -> std::io::Result<Outcome> {
    let _raw = RawMode::enter(libc::STDIN_FILENO)?;
    let mut editor = LineEditor::new(history);
    let mut stdin = std::io::stdin().lock();
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 64];
    write!(out, "{prompt}")?;
    out.flush()?;
    let redraw = |out: &mut dyn Write, editor: &LineEditor| -> std::io::Result<()> {
        // Back to the row start, prompt and line, clear the rest, cursor into place.
        let text = editor.text();
        let behind = text.chars().count() - editor.cursor();
        write!(out, "\r{prompt}{text}\x1b[K")?;
        if behind > 0 {
            write!(out, "\x1b[{behind}D")?;
        }
        out.flush()
    };
    loop {
        let read = stdin.read(&mut buffer)?;
        if read == 0 {
            write!(out, "\r\n")?;
            return Ok(Outcome::EndOfInput);
        }
        pending.extend_from_slice(&buffer[..read]);
        let (keys, used) = decode_keys(&pending);
        pending.drain(..used);
        for key in keys {
            match editor.apply(key) {
                Outcome::Editing => {}
                done => {
                    redraw(out, &editor)?;
                    if done == Outcome::Interrupted {
                        write!(out, "^C")?;
                    }
                    write!(out, "\r\n")?;
                    out.flush()?;
                    return Ok(done);
                }
            }
        }
        redraw(out, &editor)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn type_keys(history: &[String], keys: &[Key]) -> (Outcome, String, usize) {
        let mut editor = LineEditor::new(history);
        let mut last = Outcome::Editing;
        for &k in keys {
            last = editor.apply(k);
        }
        (last, editor.text(), editor.cursor())
    }

    fn chars(text: &str) -> Vec<Key> {
        text.chars().map(Key::Char).collect()
    }

    #[test]
    fn decodes_characters_controls_and_escape_sequences() {
        let (keys, used) = decode_keys(b"a\x1b[A\x1b[D\x1bOH\x1b[3~\x7f\r\x01\x05\x15\x17");
        assert_eq!(used, 20);
        assert_eq!(
            keys,
            vec![
                Key::Char('a'),
                Key::Up,
                Key::Left,
                Key::Home,
                Key::Delete,
                Key::Backspace,
                Key::Enter,
                Key::Home,
                Key::End,
                Key::KillStart,
                Key::KillWord,
            ]
        );
        // UTF-8 characters, and incomplete input left for the next read.
        let (keys, used) = decode_keys("µ€".as_bytes());
        assert_eq!((keys, used), (vec![Key::Char('µ'), Key::Char('€')], 5));
        let (keys, used) = decode_keys(b"x\x1b[");
        assert_eq!((keys, used), (vec![Key::Char('x')], 1));
        let (keys, used) = decode_keys(&"€".as_bytes()[..2]);
        assert_eq!((keys, used), (vec![], 0));
        // Unknown sequences are consumed and ignored.
        let (keys, used) = decode_keys(b"\x1b[15~z");
        assert_eq!((keys, used), (vec![Key::Ignored, Key::Char('z')], 6));
    }

    #[test]
    fn edits_in_the_middle_of_the_line() {
        let mut keys = chars("SELEC 1");
        keys.extend([Key::Left, Key::Left]);
        keys.push(Key::Char('T'));
        keys.extend([Key::Home, Key::Delete, Key::Char('s'), Key::End]);
        keys.push(Key::Char(';'));
        let (outcome, text, cursor) = type_keys(&[], &keys);
        assert_eq!(outcome, Outcome::Editing);
        assert_eq!(text, "sELECT 1;");
        assert_eq!(cursor, 9);
        let mut keys = chars("SELECT 1 FROM t");
        keys.push(Key::KillWord);
        assert_eq!(type_keys(&[], &keys).1, "SELECT 1 FROM ");
        keys.extend([Key::Home, Key::Right, Key::KillEnd]);
        assert_eq!(type_keys(&[], &keys).1, "S");
        keys.extend([Key::End, Key::Backspace, Key::Char('x'), Key::Enter]);
        assert_eq!(type_keys(&[], &keys).0, Outcome::Done("x".into()));
    }

    #[test]
    fn walks_the_history_and_keeps_the_draft() {
        let history = vec!["SELECT 1;".to_string(), "SELECT 2;".to_string()];
        let mut keys = chars("dra");
        keys.push(Key::Up);
        assert_eq!(type_keys(&history, &keys).1, "SELECT 2;");
        keys.extend([Key::Up, Key::Up]);
        assert_eq!(type_keys(&history, &keys).1, "SELECT 1;");
        keys.push(Key::Down);
        assert_eq!(type_keys(&history, &keys).1, "SELECT 2;");
        keys.push(Key::Down);
        let (_, text, cursor) = type_keys(&history, &keys);
        assert_eq!((text.as_str(), cursor), ("dra", 3));
        // A recalled entry can be edited and submitted.
        let keys = vec![
            Key::Up,
            Key::Backspace,
            Key::Backspace,
            Key::Char('3'),
            Key::Enter,
        ];
        assert_eq!(
            type_keys(&history, &keys).0,
            Outcome::Done("SELECT 3".into())
        );
    }

    #[test]
    fn control_keys_end_or_abandon_the_line() {
        assert_eq!(type_keys(&[], &[Key::EndOfInput]).0, Outcome::EndOfInput);
        let keys = vec![Key::Char('a'), Key::Char('b'), Key::Home, Key::EndOfInput];
        assert_eq!(type_keys(&[], &keys).1, "b");
        assert_eq!(
            type_keys(&[], &[Key::Char('a'), Key::Interrupt]).0,
            Outcome::Interrupted
        );
        // Nothing to delete: nothing happens.
        let (_, text, cursor) = type_keys(&[], &[Key::Backspace, Key::Delete, Key::Left]);
        assert_eq!((text.as_str(), cursor), ("", 0));
    }
}
