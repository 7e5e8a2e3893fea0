//! A seeded, fault-injecting [`Storage`] for tests: an in-memory disk that simulates
//! power loss, bit flips on read and failing fsync.
//!
//! The model, per file: `written` is what the OS shows (every byte written), and
//! `durable` what a power loss keeps (the bytes up to the last successful sync). A
//! created file's name is durable only after [`Storage::sync_dir`]; truncation,
//! renames and removals are durable at once (a simplification: the engine syncs the
//! directory right after each of them anyway).
//!
//! - [`FaultyStorage::crash`] is a power loss: every file becomes its durable bytes
//!   plus, chosen by the seed, none or any prefix of its unsynced bytes, or a prefix
//!   followed by zeros (from the end of the synced bytes or a 512-byte boundary on:
//!   sectors are written whole); files whose names were never synced vanish.
//! - With [`Faults::sync_error`], a sync fails with `EIO`; like Linux, the failed
//!   write-back leaves the page cache looking written while only an unknown prefix is
//!   durable, and every *later* sync of that file reports success without persisting
//!   anything — the lie that makes retrying fsync wrong.
//! - With [`Faults::read_flip`], a read returns a copy with one bit flipped.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::storage::{Storage, StorageFile};

/// Which faults to inject, as probabilities per operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Chance that one `sync` fails with `EIO`.
    pub sync_error: f64,
    /// Chance that one `read` returns a copy with a flipped bit.
    pub read_flip: f64,
}

#[derive(Debug, Clone, Default)]
struct SimFile {
    written: Vec<u8>,
    durable: Vec<u8>,
    /// The name survives a power loss (the directory was synced since creation).
    linked: bool,
    /// A sync failed: later syncs lie.
    poisoned: bool,
}

#[derive(Debug)]
struct Disk {
    files: BTreeMap<String, SimFile>,
    rng: fastrand::Rng,
    faults: Faults,
    syncs: u64,
    failed_syncs: u64,
    flipped_reads: u64,
}

/// The fault-injecting storage. Cheap to clone (shared disk).
#[derive(Clone)]
pub struct FaultyStorage {
    disk: Arc<Mutex<Disk>>,
}

impl fmt::Debug for FaultyStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let disk = self.disk.lock();
        f.debug_struct("FaultyStorage")
            .field("files", &disk.files.len())
            .field("faults", &disk.faults)
            .finish()
    }
}

/// Counters of what the storage did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Successful syncs.
    pub syncs: u64,
    /// Syncs failed on purpose.
    pub failed_syncs: u64,
    /// Reads returned with a flipped bit.
    pub flipped_reads: u64,
}

impl FaultyStorage {
    /// An empty disk with no faults; `seed` drives every later random choice.
    pub fn new(seed: u64) -> Self {
        FaultyStorage {
            disk: Arc::new(Mutex::new(Disk {
                files: BTreeMap::new(),
                rng: fastrand::Rng::with_seed(seed),
                faults: Faults::default(),
                syncs: 0,
                failed_syncs: 0,
                flipped_reads: 0,
            })),
        }
    }

    /// Sets the faults injected from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.disk.lock().faults = faults;
    }

    /// What happened so far.
    pub fn stats(&self) -> FaultStats {
        let disk = self.disk.lock();
        FaultStats {
            syncs: disk.syncs,
            failed_syncs: disk.failed_syncs,
            flipped_reads: disk.flipped_reads,
        }
    }

    /// A power loss: returns a new disk holding what survived (see the module docs),
    /// with no faults set. This disk is left as it was, for a writer still using it.
    pub fn crash(&self) -> FaultyStorage {
        let mut disk = self.disk.lock();
        let mut rng = fastrand::Rng::with_seed(disk.rng.u64(..));
        let mut files = BTreeMap::new();
        for (name, file) in &disk.files {
            if !file.linked {
                continue;
            }
            let mut survived = file.durable.clone();
            let unsynced = if file.poisoned || file.written.len() < file.durable.len() {
                &[][..]
            } else {
                &file.written[file.durable.len()..]
            };
            if !unsynced.is_empty() {
                match rng.u8(0..3) {
                    0 => {}
                    1 => {
                        let keep = rng.usize(0..=unsynced.len());
                        survived.extend_from_slice(&unsynced[..keep]);
                    }
                    _ => {
                        // Sectors are written whole: zeros start where the synced
                        // bytes end or at a 512-byte boundary after it.
                        let start = file.durable.len();
                        let mut zero_at = start + rng.usize(0..=unsynced.len());
                        if zero_at != start {
                            zero_at = (zero_at - zero_at % 512).max(start);
                        }
                        let keep = zero_at - start;
                        survived.extend_from_slice(&unsynced[..keep]);
                        let zeros = rng.usize(0..=unsynced.len() - keep);
                        survived.resize(survived.len() + zeros, 0);
                    }
                }
            }
            files.insert(
                name.clone(),
                SimFile {
                    written: survived.clone(),
                    durable: survived,
                    linked: true,
                    poisoned: false,
                },
            );
        }
        FaultyStorage {
            disk: Arc::new(Mutex::new(Disk {
                files,
                rng,
                faults: Faults::default(),
                syncs: 0,
                failed_syncs: 0,
                flipped_reads: 0,
            })),
        }
    }

    /// Applies `f` to the visible bytes of `name` (tests use it to flip bits, cut or
    /// zero-fill a file as if the damage happened on disk). The change is durable.
    ///
    /// # Errors
    /// `NotFound` if there is no such file.
    pub fn damage(&self, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let mut disk = self.disk.lock();
        let file = disk.files.get_mut(name).ok_or_else(|| not_found(name))?;
        f(&mut file.written);
        file.durable = file.written.clone();
        Ok(())
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no file {name}"))
}

#[derive(Debug)]
struct FaultyFile {
    disk: Arc<Mutex<Disk>>,
    name: String,
}

impl StorageFile for FaultyFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut disk = self.disk.lock();
        let file = disk
            .files
            .get_mut(&self.name)
            .ok_or_else(|| not_found(&self.name))?;
        file.written.extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut disk = self.disk.lock();
        let fail = disk.faults.sync_error > 0.0 && disk.rng.f64() < disk.faults.sync_error;
        let keep_fraction = disk.rng.f64();
        let disk = &mut *disk;
        let file = disk
            .files
            .get_mut(&self.name)
            .ok_or_else(|| not_found(&self.name))?;
        if file.poisoned {
            // The lie: pages were marked clean after the failed write-back.
            disk.syncs += 1;
            return Ok(());
        }
        if fail {
            let unsynced = file.written.len().saturating_sub(file.durable.len());
            let keep = (unsynced as f64 * keep_fraction) as usize;
            let end = file.durable.len() + keep;
            file.durable = file.written[..end].to_vec();
            file.poisoned = true;
            disk.failed_syncs += 1;
            return Err(io::Error::from_raw_os_error(5));
        }
        file.durable = file.written.clone();
        disk.syncs += 1;
        Ok(())
    }
}

impl Storage for FaultyStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.disk.lock().files.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut disk = self.disk.lock();
        let flip = disk.faults.read_flip > 0.0 && disk.rng.f64() < disk.faults.read_flip;
        let mut bytes = disk
            .files
            .get(name)
            .ok_or_else(|| not_found(name))?
            .written
            .clone();
        if flip && !bytes.is_empty() {
            let at = disk.rng.usize(0..bytes.len());
            bytes[at] ^= 1 << disk.rng.u8(0..8);
            disk.flipped_reads += 1;
        }
        Ok(bytes)
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let mut disk = self.disk.lock();
        let linked = disk.files.get(name).is_some_and(|f| f.linked);
        disk.files.insert(
            name.to_string(),
            SimFile {
                linked,
                ..SimFile::default()
            },
        );
        Ok(Box::new(FaultyFile {
            disk: self.disk.clone(),
            name: name.to_string(),
        }))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        if !self.disk.lock().files.contains_key(name) {
            return Err(not_found(name));
        }
        Ok(Box::new(FaultyFile {
            disk: self.disk.clone(),
            name: name.to_string(),
        }))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let mut disk = self.disk.lock();
        let file = disk.files.get_mut(name).ok_or_else(|| not_found(name))?;
        let len = len as usize;
        file.written.truncate(len);
        file.durable = file.written.clone();
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut disk = self.disk.lock();
        let file = disk.files.remove(from).ok_or_else(|| not_found(from))?;
        disk.files.insert(to.to_string(), file);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.disk
            .lock()
            .files
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| not_found(name))
    }

    fn size(&self, name: &str) -> io::Result<u64> {
        let disk = self.disk.lock();
        let file = disk.files.get(name).ok_or_else(|| not_found(name))?;
        Ok(file.written.len() as u64)
    }

    fn sync_dir(&self) -> io::Result<()> {
        for file in self.disk.lock().files.values_mut() {
            file.linked = true;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "a simulated disk".to_string()
    }
}
