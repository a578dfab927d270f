//! `cubbyhole-relay`: runs the relay's HTTP server. `--help` lists the
//! options; the crate README explains them.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cubbyhole_relay::{serve, ServerConfig, StorageConfig};
use tracing::{error, info};

/// The binary's allocator: jemalloc (the `jemalloc` feature, on by
/// default), tuned by [`tune_allocator`]. With the system's malloc (glibc)
/// the memory of a connection flood stayed with the process after it
/// (about 218 MiB instead of 7 MiB; BENCHMARKS.md "Memory after a
/// connection flood").
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How long jemalloc keeps freed ("dirty") pages before giving them back to
/// the system, in milliseconds (its default is 10 s).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
const DIRTY_DECAY_MS: isize = 1000;

/// Has jemalloc give freed memory back to the system within about
/// [`DIRTY_DECAY_MS`], from its own background threads: without them it
/// purges only when the process allocates again, so an idle relay kept the
/// memory of a flood. Through jemalloc's control interface (safe calls).
/// Nothing is changed when `_RJEM_MALLOC_CONF` is set: an operator's own
/// jemalloc settings (`background_thread:true,dirty_decay_ms:N`) apply
/// then. A failure is logged and otherwise ignored: the relay then just
/// keeps more memory.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
fn tune_allocator() {
    if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
        info!("allocator: jemalloc, as _RJEM_MALLOC_CONF sets it");
        return;
    }
    match tune_jemalloc() {
        Ok(()) => info!(dirty_decay_ms = DIRTY_DECAY_MS, "allocator: jemalloc"),
        Err(e) => tracing::warn!(error = %e, "could not tune the allocator (jemalloc)"),
    }
}

/// The settings [`tune_allocator`] makes.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
fn tune_jemalloc() -> tikv_jemalloc_ctl::Result<()> {
    use tikv_jemalloc_ctl::{arenas, background_thread, Access, AsName};
    // The default for arenas made from now on (one per runtime thread)...
    b"arenas.dirty_decay_ms\0".name().write(DIRTY_DECAY_MS)?;
    // ... and those made already (the main thread's).
    for arena in 0..arenas::narenas::read().unwrap_or(0) {
        let name = format!("arena.{arena}.dirty_decay_ms\0");
        // Arenas not made yet refuse: they will take the default above.
        let _ = name.as_bytes().name().write(DIRTY_DECAY_MS);
    }
    background_thread::write(true)
}

/// The system's allocator: nothing to tune.
#[cfg(not(all(feature = "jemalloc", not(target_env = "msvc"))))]
fn tune_allocator() {}

const PREFIX: &str = "CUBBYHOLE_RELAY_";
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// What the command line, the environment and the config file set.
#[derive(Debug)]
struct Settings {
    listen: String,
    db: Option<PathBuf>,
    postgres: Option<String>,
    memory: bool,
    log: Option<String>,
    log_format: LogFormat,
    server: ServerConfig,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: DEFAULT_LISTEN.to_owned(),
            db: None,
            postgres: None,
            memory: false,
            log: None,
            log_format: LogFormat::Text,
            server: ServerConfig::default(),
        }
    }
}

type Apply = fn(&mut Settings, &str) -> Result<(), String>;

/// One setting: its key (the environment variable and config file key is
/// `CUBBYHOLE_RELAY_` + key, the flag `--` + key in lower case with `-`),
/// whether the flag takes no value, its default and help.
struct Key {
    key: &'static str,
    switch: bool,
    default: &'static str,
    help: &'static str,
    apply: Apply,
}

fn number<T: std::str::FromStr>(value: &str) -> Result<T, String> {
    let cleaned: String = value.chars().filter(|c| *c != '_').collect();
    cleaned
        .parse()
        .map_err(|_| format!("expected a non-negative integer, got {value:?}"))
}

fn boolean(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {value:?}")),
    }
}

macro_rules! limit {
    ($field:ident) => {
        |s: &mut Settings, v: &str| {
            s.server.limits.$field = number(v)?;
            Ok(())
        }
    };
}

macro_rules! bound {
    ($field:ident) => {
        |s: &mut Settings, v: &str| {
            s.server.relay.$field = number(v)?;
            Ok(())
        }
    };
}

// The defaults below are checked against the library's by a test.
const KEYS: &[Key] = &[
    Key {
        key: "LISTEN",
        switch: false,
        default: DEFAULT_LISTEN,
        help: "address and port to listen on",
        apply: |s, v| {
            s.listen = v.to_owned();
            Ok(())
        },
    },
    Key {
        key: "DB",
        switch: false,
        default: "",
        help: "SQLite database file (created if missing)",
        apply: |s, v| {
            s.db = Some(PathBuf::from(v));
            Ok(())
        },
    },
    Key {
        key: "POSTGRES",
        switch: false,
        default: "",
        help: "PostgreSQL URL (needs the `postgres` feature); several relays may share it",
        apply: |s, v| {
            s.postgres = Some(v.to_owned());
            Ok(())
        },
    },
    Key {
        key: "MEMORY",
        switch: true,
        default: "false",
        help: "SQLite in memory: everything is lost at exit (tests, demos)",
        apply: |s, v| {
            s.memory = boolean(v)?;
            Ok(())
        },
    },
    Key {
        key: "CORS_ORIGINS",
        switch: false,
        default: "",
        help: "browser origins allowed (CORS), `*` for any; the flag is repeatable, \
               the variable and the file take a comma-separated list",
        apply: |s, v| {
            s.server.cors_origins = v
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(str::to_owned)
                .collect();
            Ok(())
        },
    },
    Key {
        key: "WEB_ROOT",
        switch: false,
        default: "",
        help: "serve the static files of this directory (a browser client) on GET and HEAD \
               outside /v1/, `/` being index.html; none by default",
        apply: |s, v| {
            s.server.web_root = Some(PathBuf::from(v));
            Ok(())
        },
    },
    Key {
        key: "LOG",
        switch: false,
        default: "info",
        help: "log filter (tracing env-filter syntax, e.g. `info` or \
               `warn,cubbyhole_relay::access=info`); RUST_LOG when unset",
        apply: |s, v| {
            s.log = Some(v.to_owned());
            Ok(())
        },
    },
    Key {
        key: "LOG_FORMAT",
        switch: false,
        default: "text",
        help: "log line format: `text` (for people) or `json` (one object per line, \
               for log collectors)",
        apply: |s, v| {
            s.log_format = match v.to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(format!("expected text or json, got {v:?}")),
            };
            Ok(())
        },
    },
    Key {
        key: "MAX_BODY_BYTES",
        switch: false,
        default: "524288",
        help: "largest request body (0: no limit)",
        apply: limit!(max_body_bytes),
    },
    Key {
        key: "DEPOSITS_PER_MINUTE",
        switch: false,
        default: "600",
        help: "deposits per client address per minute (0: no limit)",
        apply: limit!(deposits_per_minute),
    },
    Key {
        key: "CLAIMS_PER_MINUTE",
        switch: false,
        default: "60",
        help: "bundle fetches (one-time prekey claims) per client address per minute (0: no limit)",
        apply: limit!(claims_per_minute),
    },
    Key {
        key: "REQUESTS_PER_MINUTE",
        switch: false,
        default: "1200",
        help: "requests per client address per minute (0: no limit)",
        apply: limit!(requests_per_minute),
    },
    Key {
        key: "TOTAL_STORAGE_BYTES",
        switch: false,
        default: "4294967296",
        help: "most pending envelope bytes on the relay (0: no limit)",
        apply: limit!(total_storage_bytes),
    },
    Key {
        key: "STRANGERS_STORAGE_PERCENT",
        switch: false,
        default: "25",
        help: "part of TOTAL_STORAGE_BYTES that strangers' (stamped) deposits may take together",
        apply: limit!(strangers_storage_percent),
    },
    Key {
        key: "FAIR_SHARE_PERCENT",
        switch: false,
        default: "75",
        help: "above this part of TOTAL_STORAGE_BYTES only mailboxes holding less than \
               FAIR_SHARE_BYTES accept deposits",
        apply: limit!(fair_share_percent),
    },
    Key {
        key: "FAIR_SHARE_BYTES",
        switch: false,
        default: "1048576",
        help: "see FAIR_SHARE_PERCENT",
        apply: limit!(fair_share_bytes),
    },
    Key {
        key: "REQUEST_TIMEOUT_MS",
        switch: false,
        default: "30000",
        help: "longest a request may take; long polls get MAX_WAIT_MS more (0: no limit)",
        apply: limit!(request_timeout_ms),
    },
    Key {
        key: "HEADER_TIMEOUT_MS",
        switch: false,
        default: "10000",
        help: "longest a client may take to send request headers, or stay idle \
               between requests (0: no limit)",
        apply: limit!(header_timeout_ms),
    },
    Key {
        key: "BODY_TIMEOUT_MS",
        switch: false,
        default: "10000",
        help: "time allowed for a request body after its headers, extended by 1 s per \
               MIN_BODY_BYTES_PER_SEC bytes received; slower is 408 (0: none)",
        apply: limit!(body_timeout_ms),
    },
    Key {
        key: "MIN_BODY_BYTES_PER_SEC",
        switch: false,
        default: "1024",
        help: "upload rate that keeps extending BODY_TIMEOUT_MS (0: a fixed body timeout)",
        apply: limit!(min_body_bytes_per_sec),
    },
    Key {
        key: "MAX_CONNECTIONS",
        switch: false,
        default: "8192",
        help: "most connections open at once, also kept below the file-descriptor limit \
               (which the relay raises to its hard limit at start) less 64 (0: that limit only)",
        apply: limit!(max_connections),
    },
    Key {
        key: "MAX_CONNECTIONS_PER_ADDRESS",
        switch: false,
        default: "64",
        help: "most connections open at once from one client address (IPv6: per /64; not \
               applied with TRUST_FORWARDED_FOR) (0: no limit)",
        apply: limit!(max_connections_per_address),
    },
    Key {
        key: "MAX_WAIT_MS",
        switch: false,
        default: "30000",
        help: "cap on a fetch's wait_ms (0: no long polls)",
        apply: limit!(max_wait_ms),
    },
    Key {
        key: "TRUST_FORWARDED_FOR",
        switch: true,
        default: "false",
        help: "rate-limit by the first X-Forwarded-For address (only behind a proxy that sets it)",
        apply: |s, v| {
            s.server.limits.trust_forwarded_for = boolean(v)?;
            Ok(())
        },
    },
    Key {
        key: "MAX_ENVELOPE_BYTES",
        switch: false,
        default: "262144",
        help: "largest envelope payload",
        apply: bound!(max_envelope_bytes),
    },
    Key {
        key: "MAX_PENDING_ENVELOPES",
        switch: false,
        default: "10000",
        help: "most envelopes pending in one mailbox",
        apply: bound!(max_pending_envelopes),
    },
    Key {
        key: "MAX_PENDING_BYTES",
        switch: false,
        default: "67108864",
        help: "most payload bytes pending in one mailbox",
        apply: bound!(max_pending_bytes),
    },
    Key {
        key: "MAX_ONE_TIME_PREKEYS",
        switch: false,
        default: "1000",
        help: "most one-time prekeys per device",
        apply: bound!(max_one_time_prekeys),
    },
    Key {
        key: "RETENTION_SECS",
        switch: false,
        default: "2592000",
        help: "how long an envelope is kept (30 days)",
        apply: bound!(retention),
    },
    Key {
        key: "CHALLENGE_TTL_SECS",
        switch: false,
        default: "300",
        help: "how long a mailbox challenge stays valid",
        apply: bound!(challenge_ttl),
    },
    Key {
        key: "CLAIMS_PER_DEVICE_BURST",
        switch: false,
        default: "20",
        help: "one-time prekeys claimed from one device at once, before the hourly rate applies",
        apply: bound!(claims_per_device_burst),
    },
    Key {
        key: "CLAIMS_PER_DEVICE_PER_HOUR",
        switch: false,
        default: "60",
        help: "one-time prekeys claimed from one device per hour, whoever asks (0: no limit)",
        apply: bound!(claims_per_device_per_hour),
    },
    Key {
        key: "DEPOSIT_STAMP_DIFFICULTY",
        switch: false,
        default: "20",
        help: "leading zero bits (plus log2 of the 4 KiB blocks) of the stamp a deposit \
               without the mailbox's access key needs: ~2^20 SHA-256 (0: no stamp)",
        apply: bound!(deposit_stamp_difficulty),
    },
    Key {
        key: "IDENTITY_STAMP_DIFFICULTY",
        switch: false,
        default: "24",
        help: "leading zero bits of the stamp a device's first upload needs (0: no stamp)",
        apply: bound!(identity_stamp_difficulty),
    },
    Key {
        key: "MAX_STRANGER_ENVELOPES",
        switch: false,
        default: "100",
        help: "most envelopes in a mailbox's strangers' share (stamped deposits)",
        apply: bound!(max_stranger_envelopes),
    },
    Key {
        key: "MAX_STRANGER_BYTES",
        switch: false,
        default: "1048576",
        help: "most payload bytes in a mailbox's strangers' share",
        apply: bound!(max_stranger_bytes),
    },
    Key {
        key: "STRANGER_IDLE_SECS",
        switch: false,
        default: "604800",
        help: "a mailbox whose owner was not seen for this long takes no stamped deposits (7 days)",
        apply: bound!(stranger_idle),
    },
    Key {
        key: "INACTIVE_AFTER_SECS",
        switch: false,
        default: "2592000",
        help: "a mailbox whose owner was not seen for this long is inactive (30 days)",
        apply: bound!(inactive_after),
    },
    Key {
        key: "INACTIVE_RETENTION_SECS",
        switch: false,
        default: "604800",
        help: "how long an inactive mailbox's envelopes are kept (7 days)",
        apply: bound!(inactive_retention),
    },
    Key {
        key: "DIRECTORY_IDLE_SECS",
        switch: false,
        default: "7776000",
        help: "a device whose owner was not seen for this long is deleted with its prekeys \
               and mailbox (90 days)",
        apply: bound!(directory_idle),
    },
    Key {
        key: "ACCESS_GRACE_SECS",
        switch: false,
        default: "86400",
        help: "how long a mailbox's previous access key is still accepted after a rotation (1 day)",
        apply: bound!(access_grace),
    },
    Key {
        key: "MAX_FETCH_ENVELOPES",
        switch: false,
        default: "1000",
        help: "most envelopes returned by one fetch",
        apply: bound!(max_fetch_envelopes),
    },
    Key {
        key: "MAX_FETCH_BYTES",
        switch: false,
        default: "8388608",
        help: "most payload bytes returned by one fetch",
        apply: bound!(max_fetch_bytes),
    },
    Key {
        key: "MAX_ACKNOWLEDGE_IDS",
        switch: false,
        default: "1000",
        help: "most ids in one acknowledgement",
        apply: bound!(max_acknowledge_ids),
    },
    Key {
        key: "REQUIRE_PUBLISHED_MAILBOX",
        switch: false,
        default: "true",
        help: "refuse deposits and challenges for mailboxes of devices that never published",
        apply: |s, v| {
            s.server.relay.require_published_mailbox = boolean(v)?;
            Ok(())
        },
    },
];

fn flag_name(key: &str) -> String {
    format!("--{}", key.to_ascii_lowercase().replace('_', "-"))
}

fn find_key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.key == name)
}

fn help() -> String {
    let mut out = String::from(
        "cubbyhole-relay: the cubbyhole prekey directory and mailbox over HTTP\n\n\
         USAGE:\n    cubbyhole-relay --db relay.db [--listen 127.0.0.1:8080] [OPTIONS]\n    \
         cubbyhole-relay --postgres postgres://user@host/db [OPTIONS]\n    \
         cubbyhole-relay --memory [OPTIONS]\n    \
         cubbyhole-relay after-restore (--db PATH | --postgres URL) [--counter-margin-secs N]\n\n\
         Every option can also be set by the environment variable named on its\n\
         second line, or by a line `NAME = value` (same name) in the file given\n\
         with --config FILE (or CUBBYHOLE_RELAY_CONFIG). The command line wins\n\
         over the environment, which wins over the file. Switches take no value\n\
         on the command line (`--memory`) and true/false elsewhere.\n\n\
         OPTIONS:\n",
    );
    let mut line = |flag: String, env: String, help: &str, default: &str| {
        out.push_str(&format!("    {flag}\n        {env}: {help}"));
        if !default.is_empty() {
            out.push_str(&format!(" [default: {default}]"));
        }
        out.push('\n');
    };
    line(
        "--config FILE".into(),
        format!("{PREFIX}CONFIG"),
        "read settings from FILE (`NAME = value` lines, # comments)",
        "",
    );
    for key in KEYS {
        let flag = match (key.key, key.switch) {
            ("CORS_ORIGINS", _) => "--cors-origin ORIGIN".to_owned(),
            (_, true) => flag_name(key.key),
            (k, false) => format!("{} {}", flag_name(k), value_name(k)),
        };
        line(flag, format!("{PREFIX}{}", key.key), key.help, key.default);
    }
    out.push_str(&format!(
        "    -h, --help\n        print this help\n    -V, --version\n        print the version\n\n\
         Stop with Ctrl-C or SIGTERM: the relay finishes the requests in flight.\n\n\
         AFTER A RESTORE:\n    \
         cubbyhole-relay after-restore, with the storage options above, runs once after\n    \
         the database was restored from a backup, before any relay serves it: it deletes\n    \
         every one-time prekey and challenge and raises every device's upload counter to\n    \
         now + N seconds (--counter-margin-secs N, default {}), then exits.\n",
        cubbyhole_relay::restore::DEFAULT_COUNTER_MARGIN_SECS
    ));
    out
}

fn value_name(key: &str) -> &'static str {
    match key {
        "LISTEN" => "ADDR",
        "DB" => "PATH",
        "WEB_ROOT" => "DIR",
        "POSTGRES" => "URL",
        "LOG" => "FILTER",
        "LOG_FORMAT" => "FORMAT",
        "REQUIRE_PUBLISHED_MAILBOX" => "BOOL",
        _ => "N",
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Run(Vec<(&'static str, String)>, Option<PathBuf>),
    /// `after-restore`: the settings, the config file and the margin.
    AfterRestore(Vec<(&'static str, String)>, Option<PathBuf>, Option<u64>),
    Help,
    Version,
}

/// Parses the arguments (without the program name) into settings to apply,
/// in order, and the config file.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    let after_restore = args.next_if(|a| a == "after-restore").is_some();
    let mut margin = None;
    let mut sets = Vec::new();
    let mut config = None;
    let mut cors = Vec::new();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args.next().ok_or_else(|| format!("{what} needs a value")),
            }
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--config" => config = Some(PathBuf::from(value("--config")?)),
            "--cors-origin" => cors.push(value("--cors-origin")?),
            "--counter-margin-secs" if after_restore => {
                margin = Some(number(&value("--counter-margin-secs")?)?);
            }
            _ => {
                let key = KEYS
                    .iter()
                    .find(|k| flag_name(k.key) == name && k.key != "CORS_ORIGINS")
                    .ok_or_else(|| format!("unknown option {name:?} (see --help)"))?;
                let v = if key.switch {
                    inline.clone().unwrap_or_else(|| "true".to_owned())
                } else {
                    value(&name)?
                };
                sets.push((key.key, v));
            }
        }
    }
    if !cors.is_empty() {
        sets.push(("CORS_ORIGINS", cors.join(",")));
    }
    if after_restore {
        return Ok(Command::AfterRestore(sets, config, margin));
    }
    Ok(Command::Run(sets, config))
}

/// Parses a config file: `NAME = value` lines, `#` comments, blank lines;
/// values may be quoted.
fn parse_config(text: &str) -> Result<Vec<(&'static str, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected NAME = value", n + 1))?;
        let name = name.trim();
        let key = name
            .strip_prefix(PREFIX)
            .and_then(find_key)
            .ok_or_else(|| format!("line {}: unknown setting {name:?}", n + 1))?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        out.push((key.key, value.to_owned()));
    }
    Ok(out)
}

/// The settings from the environment (`CUBBYHOLE_RELAY_*`).
fn from_env(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(&'static str, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if rest == "CONFIG" {
            continue;
        }
        let key = find_key(rest).ok_or_else(|| format!("unknown environment variable {name}"))?;
        out.push((key.key, value));
    }
    Ok(out)
}

fn apply(
    settings: &mut Settings,
    sets: &[(&'static str, String)],
    source: &str,
) -> Result<(), String> {
    for (name, value) in sets {
        let key = find_key(name).ok_or_else(|| format!("unknown setting {name}"))?;
        (key.apply)(settings, value).map_err(|e| format!("{source}: {PREFIX}{name}: {e}"))?;
    }
    Ok(())
}

/// Builds the settings: defaults, then the config file, the environment,
/// the command line.
fn settings(
    args: Vec<(&'static str, String)>,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
) -> Result<Settings, String> {
    let config = config.or_else(|| {
        env.iter()
            .find(|(k, _)| k == &format!("{PREFIX}CONFIG"))
            .map(|(_, v)| PathBuf::from(v))
    });
    let mut settings = Settings::default();
    if let Some(path) = config {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        let sets =
            parse_config(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        apply(&mut settings, &sets, "config file")?;
    }
    apply(&mut settings, &from_env(env)?, "environment")?;
    apply(&mut settings, &args, "command line")?;
    settings.server.storage = match (&settings.db, &settings.postgres, settings.memory) {
        (Some(path), None, false) => StorageConfig::Sqlite(path.clone()),
        (None, Some(url), false) => StorageConfig::Postgres(url.clone()),
        (None, None, true) => StorageConfig::SqliteMemory,
        (None, None, false) => {
            return Err("choose the storage: --db PATH, --postgres URL or --memory".into())
        }
        _ => return Err("choose one storage: --db, --postgres or --memory".into()),
    };
    Ok(settings)
}

fn init_logs(filter: Option<&str>, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = filter
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        // {"timestamp", "level", "target", "message", the event's fields,
        // "span": {"name": "request", "request_id": ...}} on one line.
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .init(),
    }
}

/// `cubbyhole-relay after-restore`: runs the step and prints what it did.
fn after_restore(settings: &Settings, margin: Option<u64>) -> ExitCode {
    use cubbyhole_relay::restore::{after_restore, DEFAULT_COUNTER_MARGIN_SECS};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let margin = margin.unwrap_or(DEFAULT_COUNTER_MARGIN_SECS);
    match after_restore(&settings.server.storage, now, margin) {
        Ok(report) => {
            println!(
                "cubbyhole-relay after-restore: deleted {} one-time prekeys and {} challenges; \
                 raised the upload counter of {} of {} devices to {} (now + {margin} s)",
                report.one_time_prekeys_deleted,
                report.challenges_deleted,
                report.counters_raised,
                report.devices,
                report.counter_floor,
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cubbyhole-relay after-restore: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard limit (each connection
/// is a file descriptor), and logs what it got: the server keeps its
/// connection cap below it.
fn raise_file_limit() {
    #[cfg(unix)]
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(file_descriptors = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C: shutting down"),
        () = terminate => info!("SIGTERM: shutting down"),
    }
}

fn main() -> ExitCode {
    let command = match parse_args(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("cubbyhole-relay: {e}");
            return ExitCode::from(2);
        }
    };
    let (args, config, restore) = match command {
        Command::Help => {
            print!("{}", help());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("cubbyhole-relay {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Run(args, config) => (args, config, None),
        Command::AfterRestore(args, config, margin) => (args, config, Some(margin)),
    };
    let settings = match settings(args, config, std::env::vars().collect()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("cubbyhole-relay: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(margin) = restore {
        return after_restore(&settings, margin);
    }
    let listen: SocketAddr = match settings.listen.parse() {
        Ok(addr) => addr,
        Err(_) => {
            eprintln!(
                "cubbyhole-relay: --listen: expected an address and port like 127.0.0.1:8080, got {:?}",
                settings.listen
            );
            return ExitCode::from(2);
        }
    };
    init_logs(settings.log.as_deref(), settings.log_format);
    tune_allocator();
    raise_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "could not start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = bind(listen)?;
        serve(listener, settings.server, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Logged at `error` when it happened; said once more for whoever
        // reads the exit (systemd's journal keeps stderr too).
        Err(e @ cubbyhole_relay::ServerError::LogFlushFailed(_)) => {
            eprintln!("cubbyhole-relay: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            error!(error = %e, "the relay could not run");
            eprintln!("cubbyhole-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The listen backlog asked for: room for a burst of connections (the
/// kernel caps it at `net.core.somaxconn`, 4096 on current Linux). Tokio's
/// default of 1024 overflowed under a connection flood, and the honest
/// handshakes dropped then waited a second for their retransmission.
const LISTEN_BACKLOG: u32 = 8192;

/// Binds the listening socket (address reuse as tokio's `bind` sets it).
fn bind(listen: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubbyhole::relay::RelayConfig;
    use cubbyhole_relay::Limits;

    fn run(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    /// `tune_jemalloc` turns on jemalloc's background threads and the short
    /// decay, for arenas made later and for the main thread's: without them
    /// the memory of a connection flood stayed with the relay. (That the
    /// binary allocates with jemalloc at all is not checked here: jemalloc's
    /// counts need its `stats` build; BENCHMARKS.md has the measurement.)
    #[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
    #[test]
    fn tune_jemalloc_turns_on_purging_in_the_background() {
        use tikv_jemalloc_ctl::{background_thread, Access, AsName};
        tune_jemalloc().unwrap();
        assert!(background_thread::read().unwrap());
        let decay: isize = b"arenas.dirty_decay_ms\0".name().read().unwrap();
        assert_eq!(decay, DIRTY_DECAY_MS);
        let decay: isize = b"arena.0.dirty_decay_ms\0".name().read().unwrap();
        assert_eq!(decay, DIRTY_DECAY_MS);
    }

    #[test]
    fn defaults_match_the_library() {
        let defaults = Settings::default();
        let mut from_table = Settings::default();
        for key in KEYS {
            if !key.default.is_empty() {
                (key.apply)(&mut from_table, key.default).unwrap();
            }
        }
        from_table.log = None;
        assert_eq!(from_table.log_format, defaults.log_format);
        assert_eq!(from_table.server, defaults.server);
        assert_eq!(from_table.listen, defaults.listen);
        assert_eq!(defaults.server.limits, Limits::default());
        assert_eq!(defaults.server.relay, RelayConfig::default());
    }

    #[test]
    fn parses_the_command_line() {
        assert_eq!(run(&["--help"]).unwrap(), Command::Help);
        assert_eq!(run(&["-V"]).unwrap(), Command::Version);
        let Command::Run(sets, config) = run(&[
            "--listen",
            "0.0.0.0:9000",
            "--db=relay.db",
            "--cors-origin",
            "https://a.example",
            "--cors-origin=https://b.example",
            "--trust-forwarded-for",
            "--max-wait-ms",
            "1_000",
            "--config",
            "relay.conf",
        ])
        .unwrap() else {
            panic!("not a run")
        };
        assert_eq!(config, Some(PathBuf::from("relay.conf")));
        let s = {
            let mut s = Settings::default();
            apply(&mut s, &sets, "test").unwrap();
            s
        };
        assert_eq!(s.listen, "0.0.0.0:9000");
        assert_eq!(s.db, Some(PathBuf::from("relay.db")));
        assert_eq!(
            s.server.cors_origins,
            vec![
                "https://a.example".to_owned(),
                "https://b.example".to_owned()
            ]
        );
        assert!(s.server.limits.trust_forwarded_for);
        assert_eq!(s.server.limits.max_wait_ms, 1000);
        assert_eq!(s.server.web_root, None);
        let Command::Run(sets, _) = run(&["--web-root", "/srv/web", "--memory"]).unwrap() else {
            panic!("not a run")
        };
        let mut web = Settings::default();
        apply(&mut web, &sets, "test").unwrap();
        assert_eq!(web.server.web_root, Some(PathBuf::from("/srv/web")));
        let web = settings(
            vec![("MEMORY", "true".into())],
            None,
            vec![("CUBBYHOLE_RELAY_WEB_ROOT".into(), "/srv/env".into())],
        )
        .unwrap();
        assert_eq!(web.server.web_root, Some(PathBuf::from("/srv/env")));
        assert!(run(&["--bogus"]).is_err());
        assert!(
            run(&["--counter-margin-secs", "5"]).is_err(),
            "only after-restore"
        );
        assert_eq!(
            run(&[
                "after-restore",
                "--db",
                "x.db",
                "--counter-margin-secs",
                "5"
            ])
            .unwrap(),
            Command::AfterRestore(vec![("DB", "x.db".to_owned())], None, Some(5))
        );
        let Command::Run(sets, _) = run(&["--log-format", "json", "--memory"]).unwrap() else {
            panic!("not a run")
        };
        let mut s = Settings::default();
        apply(&mut s, &sets, "test").unwrap();
        assert_eq!(s.log_format, LogFormat::Json);
        for bad in ["yaml", ""] {
            let err = apply(
                &mut Settings::default(),
                &[("LOG_FORMAT", bad.to_owned())],
                "test",
            )
            .unwrap_err();
            assert!(
                err.contains("LOG_FORMAT") && err.contains("text or json"),
                "{err}"
            );
        }
        assert!(run(&["--db"]).is_err());
    }

    #[test]
    fn layers_file_env_and_args() {
        let dir = std::env::temp_dir().join(format!("cubbyhole-relay-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("relay.conf");
        std::fs::write(
            &file,
            "# comment\n\nCUBBYHOLE_RELAY_DB = \"from-file.db\"\nCUBBYHOLE_RELAY_CLAIMS_PER_MINUTE=5\n\
             CUBBYHOLE_RELAY_DEPOSITS_PER_MINUTE = 7\nCUBBYHOLE_RELAY_RETENTION_SECS = 60\n",
        )
        .unwrap();
        let env = vec![
            (
                "CUBBYHOLE_RELAY_CLAIMS_PER_MINUTE".to_owned(),
                "6".to_owned(),
            ),
            ("PATH".to_owned(), "/bin".to_owned()),
        ];
        let args = vec![("DEPOSITS_PER_MINUTE", "8".to_owned())];
        let s = settings(args, Some(file.clone()), env).unwrap();
        assert_eq!(
            s.server.storage,
            StorageConfig::Sqlite("from-file.db".into())
        );
        assert_eq!(s.server.limits.claims_per_minute, 6);
        assert_eq!(s.server.limits.deposits_per_minute, 8);
        assert_eq!(s.server.relay.retention, 60);

        std::fs::write(&file, "CUBBYHOLE_RELAY_NOPE = 1\n").unwrap();
        assert!(settings(vec![], Some(file.clone()), vec![]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();

        assert!(settings(vec![], None, vec![]).is_err(), "no storage chosen");
        assert!(settings(
            vec![("MEMORY", "true".into()), ("DB", "x.db".into())],
            None,
            vec![]
        )
        .is_err());
        assert!(settings(
            vec![("MEMORY", "true".into())],
            None,
            vec![("CUBBYHOLE_RELAY_TYPO".into(), "1".into())]
        )
        .is_err());
        assert!(settings(
            vec![("MEMORY", "true".into()), ("MAX_BODY_BYTES", "-1".into())],
            None,
            vec![]
        )
        .is_err());
    }

    #[test]
    fn help_names_every_setting() {
        let text = help();
        for key in KEYS {
            assert!(
                text.contains(&format!("{PREFIX}{}", key.key)),
                "{}",
                key.key
            );
        }
    }
}
