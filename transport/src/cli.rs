//! Shared by the two binaries' command lines: byte sizes, secrets from a file or the
//! environment, the shutdown signals, and config files whose keys are the long flags
//! (`listen = ":3000"` for `--listen :3000`), with flags given on the command line taking
//! precedence over the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ferry_codec::Secret;
use tokio_util::sync::CancellationToken;

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretSourceError {
    /// Both the file flag and the environment variable are set.
    #[error("give it once: {var} or {flag}, not both")]
    Both {
        /// The environment variable.
        var: String,
        /// The file flag.
        flag: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file or variable holds only white space.
    #[error("{0}: the value is empty")]
    Empty(String),
}

/// A secret from `file` (given as `flag`) or the environment variable `var`, not both; `None`
/// when neither is set. Surrounding white space (a trailing newline) is not part of it.
///
/// # Errors
/// Both are set, the file cannot be read, or the value is empty.
pub fn load_secret(file: Option<&Path>, flag: &str, var: &str) -> Result<Option<Secret>, SecretSourceError> {
    let from_env = std::env::var(var).ok();
    let (text, source) = match (file, from_env) {
        (Some(_), Some(_)) => {
            return Err(SecretSourceError::Both { var: var.to_owned(), flag: flag.to_owned() });
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| SecretSourceError::Read { path: path.to_owned(), source })?;
            (text, path.display().to_string())
        }
        (None, Some(text)) => (text, var.to_owned()),
        (None, None) => return Ok(None),
    };
    Secret::from_text(&text).map(Some).map_err(|_| SecretSourceError::Empty(source))
}

/// Crates that log whole frames (payloads: request heads, cookies, bodies) at `trace`.
const FRAME_DUMPERS: [&str; 3] = ["tungstenite", "tokio_tungstenite", "h2"];

/// The log filter for a binary: `RUST_LOG` (default `info`), with the crates that dump frame
/// payloads at `trace` held at `debug` at most unless `RUST_LOG` names them itself. `RUST_LOG=trace`
/// is for debugging ferry; it must not write public clients' credentials and cookies to disk. A
/// hold never raises a crate above the global level (`info` keeps their debug lines out too).
pub fn log_directives(rust_log: Option<&str>) -> String {
    let base = rust_log.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("info");
    let mut directives = base.to_owned();
    // The global level: the last directive without a target. Without one, crates not named are
    // off, and a hold is not needed.
    let global = base.split(',').map(str::trim).rfind(|d| !d.contains(['=', '[', ':']));
    let hold = match global.map(str::to_ascii_lowercase).as_deref() {
        Some("trace" | "debug") => "debug",
        Some("info") => "info",
        Some("warn") => "warn",
        Some("error") => "error",
        Some(_) | None => return directives,
    };
    for name in FRAME_DUMPERS {
        let named = base.split(',').any(|d| d.trim().split(['=', '[', ':']).next() == Some(name));
        if !named {
            directives.push_str(&format!(",{name}={hold}"));
        }
    }
    directives
}

/// How a binary writes its log lines (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`), for log
    /// collectors.
    Json,
}

/// Parses `--log-format text|json`.
///
/// # Errors
/// Any other value.
pub fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{text:?}: the log format is text or json")),
    }
}

/// Installs the process's logger: to stderr, filtered by `RUST_LOG` through [`log_directives`],
/// in `format`.
pub fn init_logging(format: LogFormat) {
    init_logging_to(format, std::io::stderr, std::io::IsTerminal::is_terminal(&std::io::stderr()));
}

/// As [`init_logging`], to `writer` (colours with `ansi`, in text).
pub fn init_logging_to<W>(format: LogFormat, writer: W, ansi: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(log_directives(std::env::var("RUST_LOG").ok().as_deref()))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().with_current_span(false).with_span_list(true).init(),
    }
}

/// Cancels `token` on SIGINT or SIGTERM, logging `what` happens next.
///
/// The handlers are installed before this returns (not when the future is first polled), so a
/// signal that arrives once the caller has said it is ready is never the default, fatal one.
///
/// # Errors
/// The handlers could not be installed.
pub fn cancel_on_signal(
    token: CancellationToken,
    what: &'static str,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    let (mut interrupt, mut terminate) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("signal received; {what}");
        token.cancel();
    })
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read the config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type; the message
    /// names the key and its line.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// toml's message, with the line and column.
        message: String,
    },
    /// `--config` without a path.
    #[error("--config needs a path")]
    MissingPath,
}

/// The value of `--config PATH` / `--config=PATH` in `args` (without the program name).
fn config_path(args: &[OsString]) -> Result<Option<PathBuf>, ConfigFileError> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else { continue };
        if text == "--" {
            break;
        }
        if text == "--config" {
            return iter.next().map(|p| Some(PathBuf::from(p))).ok_or(ConfigFileError::MissingPath);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Ok(Some(PathBuf::from(path)));
        }
    }
    Ok(None)
}

/// Whether the command line gives flag `--name`.
fn has_flag(args: &[OsString], name: &str) -> bool {
    let long = format!("--{name}");
    let with_value = format!("--{name}=");
    args.iter().filter_map(|a| a.to_str()).any(|a| a == long || a.starts_with(&with_value))
}

/// The command line with the config file's settings in front: `argv[0]`, then one flag per
/// file key, then the given flags, so that flags given by hand override the file (the parser
/// must let a later flag override an earlier one: clap's `args_override_self`). A list given on
/// the command line replaces the file's list rather than adding to it.
///
/// `T` checks the file first: it should list every key with its type and deny unknown ones,
/// so a typo is an error naming the key and its line. `table` renders keys whose value is a
/// table or an array of tables (such as routes) as flag values; it returns `None` for a key it
/// does not handle.
///
/// # Errors
/// The file cannot be read or does not check.
pub fn args_with_config_file<T: serde::de::DeserializeOwned>(
    argv: Vec<OsString>,
    table: impl Fn(&str, &toml::Table) -> Option<String>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let mut argv = argv.into_iter();
    let program = argv.next().unwrap_or_else(|| OsString::from("ferry"));
    let given: Vec<OsString> = argv.collect();
    let Some(path) = config_path(&given)? else {
        return Ok(std::iter::once(program).chain(given).collect());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ConfigFileError::Read { path: path.clone(), source })?;
    let invalid =
        |err: toml::de::Error| ConfigFileError::Invalid { path: path.clone(), message: err.to_string() };
    toml::from_str::<T>(&text).map_err(invalid)?;
    let file: toml::Table = toml::from_str(&text).map_err(invalid)?;
    let mut args = vec![program];
    for (key, value) in &file {
        let items: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => {
                if has_flag(&given, key) {
                    continue;
                }
                items.iter().collect()
            }
            single => vec![single],
        };
        for item in items {
            let rendered = match item {
                toml::Value::Boolean(true) => {
                    args.push(format!("--{key}").into());
                    continue;
                }
                toml::Value::Boolean(false) => continue,
                toml::Value::String(text) => Some(text.clone()),
                toml::Value::Integer(n) => Some(n.to_string()),
                toml::Value::Float(x) => Some(x.to_string()),
                toml::Value::Table(t) => table(key, t),
                toml::Value::Datetime(_) | toml::Value::Array(_) => None,
            };
            let Some(rendered) = rendered else {
                return Err(ConfigFileError::Invalid {
                    path: path.clone(),
                    message: format!("unsupported value for key `{key}`"),
                });
            };
            args.push(format!("--{key}").into());
            args.push(rendered.into());
        }
    }
    args.extend(given);
    Ok(args)
}

/// Parses a byte size: `1048576`, `64KiB`, `10MiB`, `1GiB`, or decimal `10kB`, `10MB`, `1GB`.
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a size like 10MiB or 1048576"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("{other:?} is not a size unit (B, KiB, MiB, GiB, kB, MB, GB)")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_dumpers_stay_at_debug_unless_named() {
        assert_eq!(log_directives(None), "info,tungstenite=info,tokio_tungstenite=info,h2=info");
        assert_eq!(log_directives(Some("warn")), "warn,tungstenite=warn,tokio_tungstenite=warn,h2=warn");
        assert_eq!(log_directives(Some("ferry_gateway=debug")), "ferry_gateway=debug");
        assert_eq!(log_directives(Some("trace")), "trace,tungstenite=debug,tokio_tungstenite=debug,h2=debug");
        assert_eq!(
            log_directives(Some("debug,tungstenite=trace,h2[conn]=trace")),
            "debug,tungstenite=trace,h2[conn]=trace,tokio_tungstenite=debug"
        );
    }
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Sample {
        listen: Option<String>,
        verbose: Option<bool>,
        allow_path: Option<Vec<String>>,
        route: Option<Vec<toml::Table>>,
    }

    fn with_file(text: &str, given: &[&str]) -> Result<Vec<String>, ConfigFileError> {
        let path = std::env::temp_dir().join(format!("ferry-cli-{}-{}.toml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        let mut argv = vec!["bin".to_owned(), "--config".to_owned(), path.display().to_string()];
        argv.extend(given.iter().map(|s| (*s).to_owned()));
        let result = args_with_config_file::<Sample>(
            os(&argv.iter().map(String::as_str).collect::<Vec<_>>()),
            |key, t| {
                (key == "route")
                    .then(|| format!("{}={}", t["prefix"].as_str().unwrap(), t["upstream"].as_str().unwrap()))
            },
        );
        let _ = std::fs::remove_file(&path);
        result.map(|args| {
            args.into_iter()
                .skip(1)
                .map(|a| a.into_string().unwrap())
                .filter(|a| !a.ends_with(".toml"))
                .collect()
        })
    }

    #[test]
    fn file_keys_become_flags_before_the_given_ones() {
        let args = with_file(
            "listen = \":3000\"\nverbose = true\nallow-path = [\"/a\", \"/b\"]\n[[route]]\nprefix = \"/api\"\nupstream = \"127.0.0.1:8000\"\n",
            &["--listen", ":4000"],
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "--allow-path",
                "/a",
                "--allow-path",
                "/b",
                "--listen",
                ":3000",
                "--route",
                "/api=127.0.0.1:8000",
                "--verbose",
                "--config",
                "--listen",
                ":4000"
            ]
        );
        // A list on the command line replaces the file's.
        let args = with_file("allow-path = [\"/a\"]\n", &["--allow-path", "/z"]).unwrap();
        assert_eq!(args, ["--config", "--allow-path", "/z"]);
    }

    #[test]
    fn unknown_keys_are_errors_with_their_line() {
        let err = with_file("listen = \":3000\"\nlisten-on = \":1\"\n", &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("listen-on") && text.contains("line 2"), "{text}");
        let err = with_file("verbose = \"yes\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn without_config_the_arguments_are_unchanged() {
        let args = args_with_config_file::<Sample>(os(&["bin", "--listen", ":1"]), |_, _| None).unwrap();
        assert_eq!(args, os(&["bin", "--listen", ":1"]));
        assert!(matches!(
            args_with_config_file::<Sample>(os(&["bin", "--config"]), |_, _| None),
            Err(ConfigFileError::MissingPath)
        ));
    }

    #[test]
    fn secrets_come_from_a_file_trimmed() {
        let unset = "FERRY_TEST_SECRET_NEVER_SET";
        assert!(load_secret(None, "--secret-file", unset).unwrap().is_none());
        let path = std::env::temp_dir().join(format!("ferry-cli-secret-{}", std::process::id()));
        std::fs::write(&path, "  s3cret\n").unwrap();
        let secret = load_secret(Some(&path), "--secret-file", unset).unwrap().unwrap();
        assert_eq!(secret.expose(), b"s3cret");
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(load_secret(Some(&path), "--secret-file", unset), Err(SecretSourceError::Empty(_))));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            load_secret(Some(&path), "--secret-file", unset),
            Err(SecretSourceError::Read { .. })
        ));
        // PATH is set in any test environment: file and variable together are refused.
        assert!(matches!(
            load_secret(Some(&path), "--secret-file", "PATH"),
            Err(SecretSourceError::Both { .. })
        ));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("2 GiB").unwrap(), 2 << 30);
        for bad in ["", "MiB", "1.5MiB", "10 parsecs", "-1", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
