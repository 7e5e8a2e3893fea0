//! The small file layer the engine writes through.
//!
//! Everything the log does to its directory goes through [`Storage`] and
//! [`StorageFile`]: list, read, create, append, sync, truncate, rename, remove. The
//! production implementation is [`StdStorage`] (the real file system under one
//! directory); tests plug in [`FaultyStorage`](crate::fault::FaultyStorage), which
//! simulates power loss (unsynced bytes dropped or torn), bit flips on read and
//! failing fsync, from a seed.
//!
//! Failure semantics the engine relies on, and every implementation must keep:
//! - bytes handed to [`StorageFile::write_all`] are durable only after a later
//!   [`StorageFile::sync`] returned `Ok`;
//! - a new file's name is durable only after [`Storage::sync_dir`] returned `Ok`;
//! - after `sync` fails, nothing about the unsynced bytes is known (Linux marks the
//!   pages clean after a failed write-back, so a second `sync` may lie): the engine
//!   treats it as fatal and never retries.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An open file the log appends to.
pub trait StorageFile: Send + fmt::Debug {
    /// Appends `bytes` at the end (not yet durable).
    ///
    /// # Errors
    /// Any I/O error; the engine then stops accepting writes.
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// Makes every byte written so far durable (`fdatasync`).
    ///
    /// # Errors
    /// Any I/O error, which is fatal to the engine.
    fn sync(&mut self) -> io::Result<()>;
}

/// A directory of files, as the log sees it. Names are plain file names, no paths.
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    /// The names of the files in the directory (any order).
    ///
    /// # Errors
    /// Any I/O error.
    fn list(&self) -> io::Result<Vec<String>>;

    /// The whole content of a file.
    ///
    /// # Errors
    /// `NotFound` if it does not exist; any I/O error.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;

    /// Creates a file (empty; replacing any file of that name) and opens it for appending.
    ///
    /// # Errors
    /// Any I/O error.
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;

    /// Opens an existing file for appending at its end.
    ///
    /// # Errors
    /// `NotFound` if it does not exist; any I/O error.
    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;

    /// Cuts a file to `len` bytes and makes that durable.
    ///
    /// # Errors
    /// Any I/O error.
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;

    /// Renames a file (used to move damaged files aside); durable after `sync_dir`.
    ///
    /// # Errors
    /// Any I/O error.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;

    /// Removes a file; durable after `sync_dir`.
    ///
    /// # Errors
    /// Any I/O error.
    fn remove(&self, name: &str) -> io::Result<()>;

    /// The size of a file in bytes (what a reader would see).
    ///
    /// # Errors
    /// `NotFound` if it does not exist; any I/O error.
    fn size(&self, name: &str) -> io::Result<u64>;

    /// Makes the directory's entries (created, renamed, removed files) durable.
    ///
    /// # Errors
    /// Any I/O error.
    fn sync_dir(&self) -> io::Result<()>;

    /// Where the files live, for messages and statistics.
    fn describe(&self) -> String;
}

/// The real file system under one directory.
#[derive(Debug, Clone)]
pub struct StdStorage {
    dir: PathBuf,
}

impl StdStorage {
    /// Storage in `dir`, which is created if missing.
    ///
    /// # Errors
    /// Any I/O error creating the directory.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        Ok(StdStorage { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[derive(Debug)]
struct StdFile(File);

impl StorageFile for StdFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl Storage for StdStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_string());
                }
            }
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        fs::read(self.dir.join(name))
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.join(name))?;
        Ok(Box::new(StdFile(file)))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new().append(true).open(self.dir.join(name))?;
        Ok(Box::new(StdFile(file)))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(self.dir.join(name))?;
        file.set_len(len)?;
        file.sync_all()
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }

    fn size(&self, name: &str) -> io::Result<u64> {
        Ok(fs::metadata(self.dir.join(name))?.len())
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}
