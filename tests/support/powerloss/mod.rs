//! A disk that loses everything not flushed when the power goes, for the
//! power-loss tests (tests/power_loss.rs, relay/tests/power_loss.rs).
//!
//! [`Disk::new`] compiles `shim.c` (next to this file) with `cc` into an
//! `LD_PRELOAD` library. A process started with [`Disk::preload`] keeps,
//! beside the files of [`Disk::data`], a *durable image* of them
//! ([`Disk::image`]): at each successful `fsync`/`fdatasync` of a file, the
//! content it had when the call started replaces the file's image. The
//! image is what the disk would hold if the power went now: files never
//! synced are absent, writes since a file's last sync are lost. After a
//! SIGKILL of the process, [`Disk::power_loss`] puts the image back as the
//! data (what the machine finds when the power returns) and
//! [`Disk::copy_image`] copies it for a check. [`Disk::fail_syncs`] makes
//! every sync of a data file fail with `EIO` until it is turned off again;
//! [`Disk::crash_in_next_sync`] makes the process kill itself (SIGKILL) in
//! the middle of its next sync of a data file, after the sync's snapshot
//! and its delay, before it ends: the power fails during a flush.
//! The model's limits are listed at the top of `shim.c`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The shim's source, compiled by [`Disk::new`].
const SHIM: &str = include_str!("shim.c");

/// A power-loss disk: a data directory, its durable image and the shim.
#[derive(Debug)]
pub struct Disk {
    root: PathBuf,
    /// The compiled shim.
    so: PathBuf,
    /// The watched directory (canonical).
    data: PathBuf,
    /// The durable image of `data`.
    image: PathBuf,
    /// While this file exists, syncs fail with `EIO`.
    fail_flag: PathBuf,
    /// While this file exists, the next sync kills its process.
    crash_flag: PathBuf,
    /// One line per sync the shim saw.
    log: PathBuf,
}

/// Syncs of data files the shim saw, from its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Syncs {
    /// Syncs that succeeded (and updated the image).
    pub ok: usize,
    /// Syncs that failed (with `EIO` while [`Disk::fail_syncs`] is on).
    pub failed: usize,
    /// Syncs in which the process killed itself
    /// ([`Disk::crash_in_next_sync`]).
    pub crashed: usize,
}

impl Disk {
    /// A fresh disk under `root` (created; removed on drop), with the shim
    /// compiled there.
    ///
    /// # Panics
    /// If the shim does not compile (`cc` is needed; it is also what
    /// builds the bundled SQLite).
    pub fn new(root: PathBuf) -> Disk {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("data")).expect("data dir");
        std::fs::create_dir_all(root.join("image")).expect("image dir");
        let source = root.join("shim.c");
        std::fs::write(&source, SHIM).expect("write shim.c");
        let so = root.join("powerloss.so");
        let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
        let output = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
            .arg(&so)
            .arg(&source)
            .arg("-ldl")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cc:?} to build the power-loss shim: {e}"));
        assert!(
            output.status.success(),
            "the power-loss shim does not compile:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let data = root.join("data").canonicalize().expect("data dir");
        let image = root.join("image").canonicalize().expect("image dir");
        Disk {
            fail_flag: root.join("fail-syncs"),
            crash_flag: root.join("crash-in-next-sync"),
            log: root.join("syncs.log"),
            so,
            data,
            image,
            root,
        }
    }

    /// The data directory: files here are on the power-loss disk.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// The durable image of the data directory.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The directory the disk lives in (room for other files).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Runs `command` on this disk: its syncs of data files update the
    /// image.
    pub fn preload(&self, command: &mut Command) {
        command
            .env("LD_PRELOAD", &self.so)
            .env("POWERLOSS_WATCH", &self.data)
            .env("POWERLOSS_IMAGE", &self.image)
            .env("POWERLOSS_FAIL", &self.fail_flag)
            .env("POWERLOSS_CRASH", &self.crash_flag)
            .env("POWERLOSS_LOG", &self.log);
    }

    /// Like [`preload`](Self::preload), and each sync of a data file takes
    /// `micros` longer (a slow disk: the time between a sync's start and
    /// its end is when a missing or misplaced flush shows).
    pub fn preload_slow(&self, command: &mut Command, micros: u32) {
        self.preload(command);
        command.env("POWERLOSS_DELAY_US", micros.to_string());
    }

    /// From now on every sync of a data file fails with `EIO` (`true`), or
    /// works again (`false`).
    pub fn fail_syncs(&self, on: bool) {
        if on {
            std::fs::write(&self.fail_flag, b"").expect("fail flag");
        } else {
            let _ = std::fs::remove_file(&self.fail_flag);
        }
    }

    /// From now on, a process on this disk kills itself (SIGKILL) in its
    /// next sync of a data file, after the sync's snapshot and delay and
    /// before the sync ends (so its snapshot never reaches the image).
    /// [`power_loss`](Self::power_loss) turns this off.
    pub fn crash_in_next_sync(&self) {
        std::fs::write(&self.crash_flag, b"").expect("crash flag");
    }

    /// The syncs the shim saw so far.
    pub fn syncs(&self) -> Syncs {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut syncs = Syncs::default();
        for line in log.lines() {
            let mut words = line.split(' ');
            let kind = words.next().unwrap_or("");
            if kind == "crash" {
                syncs.crashed += 1;
            } else if kind == "fsync" || kind == "fdatasync" {
                match words.next() {
                    Some("ok") => syncs.ok += 1,
                    _ => syncs.failed += 1,
                }
            }
        }
        syncs
    }

    /// Copies the durable image to `to` (replaced).
    pub fn copy_image(&self, to: &Path) {
        let _ = std::fs::remove_dir_all(to);
        copy_dir(&self.image, to);
    }

    /// The power went and came back (every process on the disk must be
    /// dead, killed with SIGKILL): the data directory becomes its durable
    /// image.
    pub fn power_loss(&self) {
        let _ = std::fs::remove_file(&self.crash_flag);
        for entry in std::fs::read_dir(&self.data).expect("data dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove");
            } else {
                std::fs::remove_file(&path).expect("remove");
            }
        }
        copy_dir(&self.image, &self.data);
    }
}

impl Drop for Disk {
    /// Removes the disk, unless `CUBBYHOLE_POWER_LOSS_KEEP` is set (to look
    /// at the image and the shim's log after a run).
    fn drop(&mut self) {
        if std::env::var_os("CUBBYHOLE_POWER_LOSS_KEEP").is_some() {
            eprintln!("power-loss disk kept in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        // A half-written image file of a process killed while it synced.
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(".powerloss-tmp")
        {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
