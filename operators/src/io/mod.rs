//! Working files: uncompressed Arrow IPC files written once and memory-mapped for every later
//! pass, so the operating system's page cache, not the heap, holds the working set.

pub mod mmap_ipc;

pub use mmap_ipc::{MappedIpcFile, MatrixWriter};
