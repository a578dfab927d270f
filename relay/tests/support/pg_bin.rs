// Where PostgreSQL's server binaries are, and whether this process may run
// them. Shared by `relay/build.rs` (`include!`) and `tests/support/pg.rs`
// (`#[path]`), so that the build enables the PostgreSQL tests exactly when
// the tests can start a server of their own.

/// The server binaries the tests run.
#[allow(dead_code)]
const PG_BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// The directory holding PostgreSQL's server binaries (`initdb`, `pg_ctl`,
/// `postgres`): the first directory on `PATH` that holds all three, else
/// the newest `/usr/lib/postgresql/<version>/bin` that does (Debian's
/// packages install them there, off `PATH`).
#[allow(dead_code)]
fn postgres_bin_dir() -> Option<std::path::PathBuf> {
    let has_all = |dir: &std::path::Path| PG_BINARIES.iter().all(|b| dir.join(b).is_file());
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|dir| has_all(dir)) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(Vec<u32>, std::path::PathBuf)> =
        std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let name = entry.file_name().into_string().ok()?;
                let version: Vec<u32> = name
                    .split('.')
                    .map(|part| part.parse().ok())
                    .collect::<Option<_>>()?;
                let bin = entry.path().join("bin");
                has_all(&bin).then_some((version, bin))
            })
            .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether this process runs as root (effective uid 0): `initdb` refuses to.
#[allow(dead_code)]
fn running_as_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved filesystem
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}
