//! Static files for a browser client ([`ServerConfig::web_root`]): `GET`
//! and `HEAD` on paths outside `/v1/` are answered from a directory, read
//! from the disk on each request (so a rebuilt package is served at once).
//!
//! Only what lies under the root is served: a path is taken segment by
//! segment and refused (`400 bad_request`) with a `.` or `..` segment, an
//! empty segment, a percent-encoded character, a backslash, a colon or a
//! control character; the file is then resolved (symbolic links followed)
//! and served only if the result still lies under the (resolved) root and
//! is a regular file of at most [`MAX_WEB_FILE_BYTES`]; anything else is
//! `404 no_route`, as a path the relay does not know. Names starting with
//! `.` (`.git`, `.env`) are never served.
//!
//! [`ServerConfig::web_root`]: crate::ServerConfig::web_root
//! [`MAX_WEB_FILE_BYTES`]: crate::server::MAX_WEB_FILE_BYTES

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use tracing::{debug, warn};

use crate::server::MAX_WEB_FILE_BYTES;

/// The `Content-Security-Policy` of every file served: scripts, styles,
/// images and connections from the relay's own origin only (the page talks
/// to this relay and nothing else); WebAssembly may be compiled
/// (`'wasm-unsafe-eval'`, for `WebAssembly.instantiateStreaming`), no
/// other `eval`, no inline script or style, no plugins, no `<base>`, and
/// the page may not be framed.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self' \
     'wasm-unsafe-eval'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     frame-ancestors 'none'";

/// Whether a request is one for a static file (when a web root is set):
/// `GET` or `HEAD` on a path outside the API (`/v1` and below).
pub(crate) fn is_web_request(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD) && path != "/v1" && !path.starts_with("/v1/")
}

/// Why a request gets no file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    /// The path is not one this server takes (`400 bad_request`).
    Malformed,
    /// No file to serve there (`404 no_route`).
    NotFound,
}

/// The `Content-Type` of a file, by its extension.
pub(crate) fn content_type(path: &Path) -> &'static str {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        // What `WebAssembly.instantiateStreaming` insists on.
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The file a request path names, relative to the root: `/` and any path
/// ending in `/` name that directory's `index.html`.
pub(crate) fn relative_path(path: &str) -> Result<PathBuf, Miss> {
    let rest = path.strip_prefix('/').ok_or(Miss::Malformed)?;
    if rest
        .chars()
        .any(|c| c == '%' || c == '\\' || c == ':' || c.is_control())
    {
        return Err(Miss::Malformed);
    }
    let (rest, index) = match rest.strip_suffix('/') {
        Some(dir) => (dir, true),
        None => (rest, rest.is_empty()),
    };
    let mut relative = PathBuf::new();
    if !rest.is_empty() {
        for segment in rest.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(Miss::Malformed);
            }
            if segment.starts_with('.') {
                return Err(Miss::NotFound);
            }
            // Whatever the platform makes of it, a segment must be one
            // plain name.
            let mut components = Path::new(segment).components();
            match (components.next(), components.next()) {
                (Some(Component::Normal(name)), None) if name == segment => relative.push(name),
                _ => return Err(Miss::Malformed),
            }
        }
    }
    if index {
        relative.push("index.html");
    }
    Ok(relative)
}

/// A file found: its bytes (none for `HEAD` or a matching `ETag`), length
/// and validator.
#[derive(Debug)]
pub(crate) struct Found {
    bytes: Vec<u8>,
    len: u64,
    etag: String,
    /// `If-None-Match` named the file as it is: `304`, no bytes.
    unchanged: bool,
}

/// Finds and reads `relative` under `root` (canonical), on a blocking
/// thread's time. `read`: whether the bytes are wanted (not for `HEAD`).
pub(crate) fn load(
    root: &Path,
    relative: &Path,
    read: bool,
    if_none_match: Option<&str>,
) -> Result<Found, Miss> {
    let canonical = std::fs::canonicalize(root.join(relative)).map_err(|_| Miss::NotFound)?;
    if !canonical.starts_with(root) {
        debug!("a static file resolves outside the web root: refused");
        return Err(Miss::NotFound);
    }
    // Checked before opening: opening a FIFO would block.
    let metadata = std::fs::metadata(&canonical).map_err(|_| Miss::NotFound)?;
    if !metadata.is_file() {
        return Err(Miss::NotFound);
    }
    let file = std::fs::File::open(&canonical).map_err(|_| Miss::NotFound)?;
    let metadata = file.metadata().map_err(|_| Miss::NotFound)?;
    if !metadata.is_file() {
        return Err(Miss::NotFound);
    }
    if metadata.len() > MAX_WEB_FILE_BYTES {
        warn!(
            bytes = metadata.len(),
            max = MAX_WEB_FILE_BYTES,
            "a static file is larger than the relay serves: answered 404"
        );
        return Err(Miss::NotFound);
    }
    let modified = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    let etag = format!(
        "W/\"{:x}-{:x}-{:x}\"",
        metadata.len(),
        modified.as_secs(),
        modified.subsec_nanos()
    );
    let unchanged = if_none_match.is_some_and(|tags| {
        tags.split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || weak(tag) == weak(&etag))
    });
    if !read || unchanged {
        return Ok(Found {
            bytes: Vec::new(),
            len: metadata.len(),
            etag,
            unchanged,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    file.take(MAX_WEB_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|_| Miss::NotFound)?;
    if bytes.len() as u64 > MAX_WEB_FILE_BYTES {
        return Err(Miss::NotFound);
    }
    let len = bytes.len() as u64;
    Ok(Found {
        bytes,
        len,
        etag,
        unchanged: false,
    })
}

/// An entity tag without its weakness mark (`If-None-Match` compares
/// weakly).
fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The headers of every file answer.
fn common_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Revalidated each time (with the `ETag`): a rebuilt package is picked
    // up at the next load.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Serves the request from `root` (canonical): the file's answer, or the
/// reason there is none. (What the request says is taken before the file
/// is read: a request is not `Sync`, so no reference to it may be held
/// across the read.)
pub(crate) fn serve(
    root: PathBuf,
    request: &Request,
) -> impl std::future::Future<Output = Result<Response, Miss>> + Send + 'static {
    let relative = relative_path(request.uri().path());
    let head = request.method() == Method::HEAD;
    let if_none_match = request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    async move { answer(root, relative?, head, if_none_match).await }
}

async fn answer(
    root: PathBuf,
    relative: PathBuf,
    head: bool,
    if_none_match: Option<String>,
) -> Result<Response, Miss> {
    let kind = content_type(&relative);
    let found = tokio::task::spawn_blocking(move || {
        load(&root, &relative, !head, if_none_match.as_deref())
    })
    .await
    .map_err(|_| Miss::NotFound)??;
    let etag = HeaderValue::from_str(&found.etag).map_err(|_| Miss::NotFound)?;
    let mut response = if found.unchanged {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else if head {
        let mut response = Response::new(Body::empty());
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(found.len));
        response
    } else {
        Response::new(Body::from(found.bytes))
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::ETAG, etag);
    common_headers(headers);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_plain_relative_names() {
        assert_eq!(relative_path("/"), Ok(PathBuf::from("index.html")));
        assert_eq!(relative_path("/a/"), Ok(PathBuf::from("a/index.html")));
        assert_eq!(relative_path("/a/b.js"), Ok(PathBuf::from("a/b.js")));
        for bad in [
            "",
            "a",
            "/..",
            "/../x",
            "/a/../../x",
            "/./x",
            "/a//b",
            "//x",
            "/%2e%2e/x",
            "/a%2Fb",
            "/a\\..\\b",
            "/c:/x",
            "/a\0b",
            "/a\nb",
        ] {
            assert_eq!(relative_path(bad), Err(Miss::Malformed), "{bad:?}");
        }
        assert_eq!(relative_path("/.git/config"), Err(Miss::NotFound));
        assert_eq!(relative_path("/a/.env"), Err(Miss::NotFound));
    }

    #[test]
    fn only_paths_outside_the_api_are_files() {
        assert!(is_web_request(&Method::GET, "/"));
        assert!(is_web_request(&Method::HEAD, "/app.wasm"));
        assert!(is_web_request(&Method::GET, "/v1x"));
        assert!(!is_web_request(&Method::GET, "/v1"));
        assert!(!is_web_request(&Method::GET, "/v1/nothing"));
        assert!(!is_web_request(&Method::POST, "/index.html"));
    }

    #[test]
    fn content_types_by_extension() {
        for (name, kind) in [
            ("a.html", "text/html; charset=utf-8"),
            ("a.HTM", "text/html; charset=utf-8"),
            ("a.js", "text/javascript; charset=utf-8"),
            ("a.mjs", "text/javascript; charset=utf-8"),
            ("a.css", "text/css; charset=utf-8"),
            ("a.wasm", "application/wasm"),
            ("a.json", "application/json"),
            ("a.svg", "image/svg+xml"),
            ("a.png", "image/png"),
            ("a.ico", "image/x-icon"),
            ("a.txt", "text/plain; charset=utf-8"),
            ("a.bin", "application/octet-stream"),
            ("noextension", "application/octet-stream"),
        ] {
            assert_eq!(content_type(Path::new(name)), kind, "{name}");
        }
    }
}
