//! Locations: parsing what the user names (a local file or directory, a glob, a `file://`,
//! `s3://` or `http(s)://` URL) into an object store, a base path and an optional glob;
//! building the S3 and HTTP stores with the connection settings of [`SourceOptions`];
//! listing the files a location stands for; and how a file is shown to the user.

use std::sync::Arc;
use std::time::Duration;

use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt,
    RetryConfig,
};
use regex::Regex;
use url::Url;

use super::SourceOptions;
use super::errors::{read_failure, source_error};
use super::format::{SUPPORTED_EXTENSIONS, TableFormat};
use crate::error::{BalansError, Result};

/// Where a location lives: the object store, the base path to list and an optional glob.
pub(super) struct ResolvedLocation {
    /// Object store root, e.g. `file:///`, `s3://bucket/`, `https://host:port/`.
    pub(super) store_url: Url,
    pub(super) store: Arc<dyn ObjectStore>,
    /// Path (inside the store) of the file or directory named before any glob.
    pub(super) base: ObjectPath,
    /// Anchored regex of the glob part, matched against paths relative to `base`.
    glob: Option<Regex>,
    kind: StoreKind,
}

/// The kind of store a location lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Local,
    S3,
    Http,
}

/// Parses `location`, builds (and registers, for remote stores) the object store it needs.
pub(super) fn resolve_location(
    ctx: &SessionContext,
    location: &str,
    opts: &SourceOptions,
) -> Result<ResolvedLocation> {
    let trimmed = location.trim();
    if trimmed.is_empty() {
        return Err(BalansError::InvalidArgument(
            "the input location must not be empty".into(),
        ));
    }
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("s3://") || lower.starts_with("s3a://") {
        resolve_s3(ctx, location, trimmed, opts)
    } else if lower.starts_with("https://") || lower.starts_with("http://") {
        resolve_http(ctx, location, trimmed, opts)
    } else if lower.starts_with("file://") {
        let url = Url::parse(trimmed).map_err(|e| source_error(location, e))?;
        let path = url.to_file_path().map_err(|()| {
            BalansError::InvalidArgument(format!("'{location}' is not a valid local file URL"))
        })?;
        resolve_local(ctx, location, &path.to_string_lossy())
    } else if let Some((scheme, _)) = trimmed.split_once("://") {
        Err(BalansError::InvalidArgument(format!(
            "unsupported location scheme '{scheme}://' in '{location}': use a local path, \
             file://, s3:// or https://"
        )))
    } else {
        resolve_local(ctx, location, trimmed)
    }
}

fn resolve_local(ctx: &SessionContext, location: &str, path: &str) -> Result<ResolvedLocation> {
    let (base, glob) = split_glob(path);
    let base = if base.is_empty() { "." } else { base.as_str() };
    let base_fs = std::path::Path::new(base);
    let canonical = base_fs.canonicalize().map_err(|e| {
        let message = if e.kind() == std::io::ErrorKind::NotFound {
            format!("'{}' does not exist", base_fs.display())
        } else {
            format!("cannot access '{}': {e}", base_fs.display())
        };
        BalansError::Source {
            location: location.to_string(),
            message,
        }
    })?;
    let object_path =
        ObjectPath::from_absolute_path(&canonical).map_err(|e| source_error(location, e))?;
    let object_store_url = ObjectStoreUrl::local_filesystem();
    let store_url: Url = AsRef::<Url>::as_ref(&object_store_url).clone();
    let store = match ctx.runtime_env().object_store(&object_store_url) {
        Ok(store) => store,
        Err(_) => {
            let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new());
            ctx.register_object_store(&store_url, Arc::clone(&store));
            store
        }
    };
    Ok(ResolvedLocation {
        store_url,
        store,
        base: object_path,
        glob: glob.map(|g| glob_to_regex(location, &g)).transpose()?,
        kind: StoreKind::Local,
    })
}

fn resolve_s3(
    ctx: &SessionContext,
    location: &str,
    trimmed: &str,
    opts: &SourceOptions,
) -> Result<ResolvedLocation> {
    let rest = trimmed
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(BalansError::InvalidArgument(format!(
            "'{location}' names no bucket: expected s3://bucket/prefix"
        )));
    }
    let (base, glob) = split_glob(key);
    let base = ObjectPath::parse(base.trim_matches('/')).map_err(|e| {
        BalansError::InvalidArgument(format!("invalid S3 key in '{location}': {e}"))
    })?;

    let store = s3_store(bucket, opts).map_err(|e| source_error(location, e))?;
    let store_url = Url::parse(&format!("s3://{bucket}/")).map_err(|e| {
        BalansError::InvalidArgument(format!("invalid bucket name in '{location}': {e}"))
    })?;
    ctx.register_object_store(&store_url, Arc::clone(&store));
    Ok(ResolvedLocation {
        store_url,
        store,
        base,
        glob: glob.map(|g| glob_to_regex(location, &g)).transpose()?,
        kind: StoreKind::S3,
    })
}

/// An S3 store for `bucket`: `--s3-endpoint` or `AWS_ENDPOINT_URL`, unsigned requests when
/// no `AWS_ACCESS_KEY_ID` is set (public buckets), region `us-east-1` unless set, plain HTTP
/// for `http://` endpoints, and the options' timeouts and retries.
pub fn s3_store(bucket: &str, opts: &SourceOptions) -> object_store::Result<Arc<dyn ObjectStore>> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let endpoint = opts
        .s3_endpoint
        .clone()
        .filter(|e| !e.trim().is_empty())
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| env("AWS_ENDPOINT"));
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut allow_http = opts.s3_allow_http;
    if let Some(endpoint) = &endpoint {
        builder = builder.with_endpoint(endpoint);
        allow_http |= endpoint.to_ascii_lowercase().starts_with("http://");
    }
    if env("AWS_ACCESS_KEY_ID").is_none() {
        builder = builder.with_skip_signature(true);
    }
    if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        builder = builder.with_region("us-east-1");
    }
    // Set client keys one by one so options coming from the environment are kept.
    for (key, value) in client_config(opts) {
        builder = builder.with_config(object_store::aws::AmazonS3ConfigKey::Client(key), value);
    }
    if allow_http {
        builder = builder.with_allow_http(true);
    }
    Ok(Arc::new(builder.with_retry(retry_config(opts)).build()?))
}

fn resolve_http(
    ctx: &SessionContext,
    location: &str,
    trimmed: &str,
    opts: &SourceOptions,
) -> Result<ResolvedLocation> {
    let url = Url::parse(trimmed).map_err(|e| {
        BalansError::InvalidArgument(format!("'{location}' is not a valid URL: {e}"))
    })?;
    if url.query().is_some() || url.path().ends_with('/') || url.path().contains('*') {
        return Err(BalansError::InvalidArgument(format!(
            "'{location}': an http(s) location must name a single file (no directory, glob or \
             query string)"
        )));
    }
    let mut store_url = url.clone();
    store_url.set_path("/");
    let store = http_store(&store_url, opts).map_err(|e| source_error(location, e))?;
    ctx.register_object_store(&store_url, Arc::clone(&store));
    let base = ObjectPath::from_url_path(url.path())
        .map_err(|e| BalansError::InvalidArgument(format!("invalid path in '{location}': {e}")))?;
    Ok(ResolvedLocation {
        store_url,
        store,
        base,
        glob: None,
        kind: StoreKind::Http,
    })
}

/// An HTTP(S) store for the server of `url` (scheme, host and port), with the options'
/// timeouts and retries; plain HTTP allowed for `http://`.
pub fn http_store(url: &Url, opts: &SourceOptions) -> object_store::Result<Arc<dyn ObjectStore>> {
    let mut base = url.clone();
    base.set_path("/");
    base.set_query(None);
    let mut client = ClientOptions::new();
    for (key, value) in client_config(opts) {
        client = client.with_config(key, value);
    }
    if url.scheme() == "http" {
        client = client.with_allow_http(true);
    }
    Ok(Arc::new(
        HttpBuilder::new()
            .with_url(base.as_str().trim_end_matches('/'))
            .with_client_options(client)
            .with_retry(retry_config(opts))
            .build()?,
    ))
}

/// Client settings derived from the options, as `object_store` configuration keys.
fn client_config(opts: &SourceOptions) -> [(ClientConfigKey, String); 2] {
    [
        (
            ClientConfigKey::ConnectTimeout,
            format!("{}ms", opts.connect_timeout.as_millis()),
        ),
        (
            ClientConfigKey::Timeout,
            format!("{}ms", opts.request_timeout.as_millis()),
        ),
    ]
}

/// Retry policy: `max_retries` quick retries, all within one request timeout.
fn retry_config(opts: &SourceOptions) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: opts.max_retries,
        retry_timeout: opts.request_timeout,
    }
}

/// Lists the files a resolved location stands for (unsorted).
pub(super) async fn list_files(
    location: &str,
    resolved: &ResolvedLocation,
) -> Result<Vec<ObjectMeta>> {
    if let Some(glob) = &resolved.glob {
        let metas = list_prefix(location, resolved).await?;
        let matched: Vec<ObjectMeta> = metas
            .into_iter()
            .filter(|meta| {
                relative_path(&resolved.base, &meta.location).is_some_and(|rel| glob.is_match(rel))
            })
            .collect();
        if matched.is_empty() {
            return Err(BalansError::BadInput(format!("no files match {location}")));
        }
        return Ok(matched);
    }

    match resolved.kind {
        StoreKind::Local => {
            let fs_path = format!("/{}", resolved.base);
            let metadata = std::fs::metadata(&fs_path).map_err(|e| source_error(location, e))?;
            if metadata.is_dir() {
                list_directory(location, resolved).await
            } else {
                Ok(vec![head(location, resolved).await?])
            }
        }
        StoreKind::Http => Ok(vec![head(location, resolved).await?]),
        StoreKind::S3 => {
            let names_dir = resolved.base.as_ref().is_empty() || location.ends_with('/');
            if !names_dir {
                match resolved.store.head(&resolved.base).await {
                    Ok(meta) => return Ok(vec![meta]),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(read_failure(location, "could not look up", e)),
                }
            }
            match list_directory(location, resolved).await {
                Err(BalansError::BadInput(_))
                    if !names_dir && TableFormat::detect(resolved.base.as_ref()).is_some() =>
                {
                    Err(BalansError::Source {
                        location: location.to_string(),
                        message: "no such object".into(),
                    })
                }
                other => other,
            }
        }
    }
}

/// Every file with a supported extension below `resolved.base`.
async fn list_directory(location: &str, resolved: &ResolvedLocation) -> Result<Vec<ObjectMeta>> {
    let metas: Vec<ObjectMeta> = list_prefix(location, resolved)
        .await?
        .into_iter()
        .filter(|meta| TableFormat::detect(meta.location.as_ref()).is_some())
        .collect();
    if metas.is_empty() {
        return Err(BalansError::BadInput(format!(
            "no profile files ({SUPPORTED_EXTENSIONS}) found in {location}"
        )));
    }
    Ok(metas)
}

async fn list_prefix(location: &str, resolved: &ResolvedLocation) -> Result<Vec<ObjectMeta>> {
    if resolved.kind == StoreKind::Http {
        return Err(BalansError::InvalidArgument(format!(
            "'{location}': listing is not supported over http(s); name a single file"
        )));
    }
    let prefix = (!resolved.base.as_ref().is_empty()).then_some(&resolved.base);
    resolved
        .store
        .list(prefix)
        .try_collect()
        .await
        .map_err(|e| read_failure(location, "could not list files", e))
}

async fn head(location: &str, resolved: &ResolvedLocation) -> Result<ObjectMeta> {
    resolved
        .store
        .head(&resolved.base)
        .await
        .map_err(|e| read_failure(location, "could not open", e))
}

/// The path of `path` below `base`, without a leading `/`; `None` if outside `base`.
pub(super) fn relative_path<'a>(base: &ObjectPath, path: &'a ObjectPath) -> Option<&'a str> {
    let base = base.as_ref();
    let path = path.as_ref();
    if base.is_empty() {
        return Some(path);
    }
    path.strip_prefix(base)?.strip_prefix('/')
}

/// How a file is shown to the user: a filesystem path or a full URL.
pub(super) fn display_path(resolved: &ResolvedLocation, path: &ObjectPath) -> String {
    match resolved.kind {
        StoreKind::Local => format!("/{path}"),
        StoreKind::S3 | StoreKind::Http => format!("{}{path}", resolved.store_url),
    }
}

/// Splits `pattern` at the first `/`-separated segment holding a glob character (`*?[`).
fn split_glob(pattern: &str) -> (String, Option<String>) {
    let segments: Vec<&str> = pattern.split('/').collect();
    let Some(first_glob) = segments
        .iter()
        .position(|segment| segment.contains(['*', '?', '[']))
    else {
        return (pattern.to_string(), None);
    };
    let mut base = segments[..first_glob].join("/");
    if base.is_empty() && pattern.starts_with('/') {
        base.push('/');
    }
    (base, Some(segments[first_glob..].join("/")))
}

/// Converts a glob into an anchored regex over `/`-separated relative paths: `*` and `?` match
/// within one segment, `**` any number of segments, `[...]`/`[!...]` a character class.
fn glob_to_regex(location: &str, glob: &str) -> Result<Regex> {
    let chars: Vec<char> = glob.chars().collect();
    let mut re = String::from("^");
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                if chars.get(i + 2) == Some(&'/') {
                    re.push_str("(?:[^/]*/)*");
                    i += 3;
                } else {
                    re.push_str(".*");
                    i += 2;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                i += 1;
            }
            '?' => {
                re.push_str("[^/]");
                i += 1;
            }
            '[' => match chars[i + 1..].iter().skip(1).position(|&c| c == ']') {
                Some(offset) => {
                    let end = i + 2 + offset;
                    let mut class: String = chars[i + 1..end].iter().collect();
                    if let Some(rest) = class.strip_prefix('!') {
                        class = format!("^{rest}");
                    }
                    re.push('[');
                    re.push_str(&class.replace('\\', "\\\\").replace('[', "\\["));
                    re.push(']');
                    i = end + 1;
                }
                None => {
                    re.push_str("\\[");
                    i += 1;
                }
            },
            c => {
                re.push_str(&regex::escape(&c.to_string()));
                i += 1;
            }
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| {
        BalansError::InvalidArgument(format!("invalid glob pattern in '{location}': {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::register_profiles;
    use crate::source::test_support::*;
    use datafusion::physical_plan::ExecutionPlanProperties;
    use std::io::Write;
    use std::time::Instant;
    use tempfile::TempDir;

    #[test]
    fn globs_stay_within_segments() {
        let (base, glob) = split_glob("/data/plates/**/*.parquet");
        assert_eq!(base, "/data/plates");
        let re = glob_to_regex("t", glob.as_deref().unwrap()).unwrap();
        assert!(re.is_match("a.parquet"));
        assert!(re.is_match("x/y/a.parquet"));
        assert!(!re.is_match("a.csv"));
        let (base, glob) = split_glob("*.csv");
        assert_eq!(base, "");
        let re = glob_to_regex("t", glob.as_deref().unwrap()).unwrap();
        assert!(re.is_match("a.csv"));
        assert!(!re.is_match("sub/a.csv"));
        let re = glob_to_regex("t", "p[!0-4]?.parquet").unwrap();
        assert!(re.is_match("p5a.parquet"));
        assert!(!re.is_match("p3a.parquet"));
        assert_eq!(
            split_glob("s3key/x.parquet"),
            ("s3key/x.parquet".into(), None)
        );
    }

    #[tokio::test]
    async fn directory_and_globs_read_files_in_path_order() {
        let dir = TempDir::new().unwrap();
        // Written in reverse order, with a subdirectory and a non-profile file.
        write_parquet(&dir.path().join("sub/c.parquet"), &profile_batch(&[5, 6]));
        write_parquet(&dir.path().join("b.parquet"), &profile_batch(&[3, 4]));
        write_parquet(&dir.path().join("a.parquet"), &profile_batch(&[1, 2]));
        std::fs::write(dir.path().join("README.txt"), "not a profile").unwrap();
        let root = path_str(dir.path());

        let cases = [
            (
                root.clone(),
                vec!["a.parquet", "b.parquet", "sub/c.parquet"],
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                format!("{root}/"),
                vec!["a.parquet", "b.parquet", "sub/c.parquet"],
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                format!("file://{root}"),
                vec!["a.parquet", "b.parquet", "sub/c.parquet"],
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                format!("{root}/*.parquet"),
                vec!["a.parquet", "b.parquet"],
                vec![1, 2, 3, 4],
            ),
            (
                format!("{root}/**/*.parquet"),
                vec!["a.parquet", "b.parquet", "sub/c.parquet"],
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                format!("{root}/s*/*.parquet"),
                vec!["sub/c.parquet"],
                vec![5, 6],
            ),
        ];
        for (location, files, ids) in cases {
            let ctx = parallel_context();
            let table = register_profiles(&ctx, &location, "t", &SourceOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{location}: {e}"));
            let expected: Vec<String> = files.iter().map(|f| format!("{root}/{f}")).collect();
            assert_eq!(table.files, expected, "{location}");
            for _ in 0..3 {
                let got = column_i64(&ctx, "SELECT \"Metadata_Id\" FROM t").await;
                assert_eq!(got, ids, "{location}");
            }
            let plan = ctx
                .table("t")
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            assert_eq!(
                plan.output_partitioning().partition_count(),
                1,
                "{location}"
            );
        }
    }

    #[tokio::test]
    async fn location_errors_are_clear() {
        let dir = TempDir::new().unwrap();
        let root = path_str(dir.path());
        let opts = SourceOptions::default();
        let ctx = SessionContext::new();

        // Empty directory and a glob that matches nothing.
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let err = register_profiles(&ctx, &format!("{root}/empty"), "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("empty")),
            "{err}"
        );
        let location = format!("{root}/*.parquet");
        let err = register_profiles(&ctx, &location, "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains(&location)),
            "{err}"
        );

        // Missing path.
        let missing = format!("{root}/nope.parquet");
        let err = register_profiles(&ctx, &missing, "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::Source { location, message }
                if location == &missing && message.contains("does not exist")),
            "{err}"
        );

        // Unknown extension.
        let json = dir.path().join("x.json");
        std::fs::write(&json, "{}").unwrap();
        let err = register_profiles(&ctx, &path_str(&json), "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("x.json")),
            "{err}"
        );

        // Mixed formats.
        let mixed = dir.path().join("mixed");
        write_parquet(&mixed.join("a.parquet"), &profile_batch(&[1]));
        std::fs::write(mixed.join("b.csv"), CSV).unwrap();
        let err = register_profiles(&ctx, &path_str(&mixed), "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("mixes") && m.contains("csv")),
            "{err}"
        );

        // Unsupported scheme.
        let err = register_profiles(&ctx, "gs://bucket/x.parquet", "t", &opts)
            .await
            .unwrap_err();
        assert!(matches!(err, BalansError::InvalidArgument(_)), "{err}");
    }

    #[tokio::test]
    async fn unreachable_stores_fail_fast() {
        let opts = SourceOptions {
            s3_endpoint: Some("http://127.0.0.1:9".into()),
            ..SourceOptions::default()
        };
        for location in [
            "s3://balans-test/plates/",
            "s3://balans-test/plates/p1.parquet",
            "http://127.0.0.1:9/plates/p1.parquet",
        ] {
            let ctx = SessionContext::new();
            let start = Instant::now();
            let err = register_profiles(&ctx, location, "t", &opts)
                .await
                .unwrap_err();
            let elapsed = start.elapsed();
            assert!(
                elapsed < Duration::from_secs(10),
                "{location}: took {elapsed:?}"
            );
            assert!(
                matches!(&err, BalansError::Source { location: l, message }
                    if l == location && message.contains("127.0.0.1:9")),
                "{location}: {err}"
            );
        }
    }

    /// Serves `body` at every path over plain HTTP (HEAD and ranged GET) until the test ends.
    fn serve_http(body: Vec<u8>) -> String {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if request.is_empty() {
                        request = line.clone();
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(spec) = lower.strip_prefix("range: bytes=") {
                        let (start, end) = spec.trim().split_once('-').unwrap();
                        let start: usize = start.parse().unwrap();
                        let end = end
                            .parse::<usize>()
                            .map_or(body.len() - 1, |e| e.min(body.len() - 1));
                        range = Some((start, end));
                    }
                }
                let head = request.starts_with("HEAD");
                let (status, content, extra) = match range {
                    Some((start, end)) => (
                        "206 Partial Content",
                        &body[start..=end],
                        format!("Content-Range: bytes {start}-{end}/{}\r\n", body.len()),
                    ),
                    None => ("200 OK", &body[..], String::new()),
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\
                     Last-Modified: Tue, 01 Jul 2025 00:00:00 GMT\r\nConnection: close\r\n\r\n",
                    content.len()
                );
                let _ = stream.write_all(header.as_bytes());
                if !head {
                    let _ = stream.write_all(content);
                }
            }
        });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn reads_a_file_over_http() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("plate.parquet");
        write_parquet(&path, &profile_batch(&[1, 2, 3]));
        let base = serve_http(std::fs::read(&path).unwrap());
        let location = format!("{base}/data/plate%201.parquet");
        let ctx = SessionContext::new();
        let table = register_profiles(&ctx, &location, "t", &SourceOptions::default())
            .await
            .unwrap();
        assert_eq!(table.files, vec![format!("{base}/data/plate 1.parquet")]);
        assert_eq!(table.format, TableFormat::Parquet);
        let ids = column_i64(&ctx, "SELECT \"Metadata_Id\" FROM t").await;
        assert_eq!(ids, vec![1, 2, 3]);
        let err = register_profiles(
            &ctx,
            &format!("{base}/data/"),
            "t",
            &SourceOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BalansError::InvalidArgument(_)), "{err}");
    }
}
