//! A PostgreSQL cluster that a test or a benchmark starts for itself and that is gone when dropped.
//!
//! Every cluster is its own `initdb` in a fresh directory under [`std::env::temp_dir`], listening
//! on 127.0.0.1 at a port nobody held a moment before, with the settings logical decoding needs
//! (`wal_level = logical`, replication slots and WAL senders) and `trust` for local connections,
//! replication connections included. Nothing is shared between clusters, so tests may run in
//! parallel. Dropping the cluster stops the server (`pg_ctl -m immediate`: the data is thrown away,
//! so there is nothing to flush) and removes the directory.
//!
//! PostgreSQL refuses to run as root: when this process is root, `initdb`, `pg_ctl` and the server
//! run as the `postgres` OS user, which then owns the directory.
//!
//! Waiting is `pg_ctl -w -t 60`'s: no clock is read here.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the binaries are when neither `IMAGO_PG_BINDIR` nor `pg_config` says (Debian's layout).
pub const DEFAULT_BINDIR: &str = "/usr/lib/postgresql/15/bin";

/// The address the cluster listens on: loopback only.
const HOST: &str = "127.0.0.1";

/// How many ports are tried before a start is given up: another process may take the port
/// between our probe and the server's bind.
const START_ATTEMPTS: u32 = 5;

/// How many lines of a log or of a command's output an error shows.
const TAIL_LINES: usize = 30;

/// How a throwaway cluster is set up.
#[derive(Debug, Clone)]
pub struct ThrowawayOptions {
    /// `fsync` of the server. Off makes commits cheap (tests); on (the default) keeps a
    /// benchmark's commits as costly as a real server's.
    pub fsync: bool,
    /// Further `postgresql.conf` settings, `(name, value)`, written after ours (so they win), the
    /// value as PostgreSQL reads it (quote strings yourself).
    pub settings: Vec<(String, String)>,
    /// The directory of `initdb`, `pg_ctl` and `psql`; `None`: `IMAGO_PG_BINDIR`, else
    /// `pg_config --bindir`, else [`DEFAULT_BINDIR`].
    pub bindir: Option<PathBuf>,
}

impl Default for ThrowawayOptions {
    fn default() -> Self {
        ThrowawayOptions { fsync: true, settings: Vec::new(), bindir: None }
    }
}

/// Why a throwaway cluster could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ThrowawayError {
    #[error("no PostgreSQL binaries ({0})")]
    NoBinaries(String),
    /// PostgreSQL refuses to run as root, and there is nobody else to run it as.
    #[error("running as root, and the `postgres` OS user cannot be found: {0}")]
    NoPostgresUser(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A command ran and failed; `output` is the end of what it printed.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command { command: String, status: String, output: String },
    /// The server did not start; `log` is the end of its log.
    #[error("the server did not start ({reason}); end of its log:\n{log}")]
    Start { reason: String, log: String },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ThrowawayError {
    let what = what.into();
    move |source| ThrowawayError::Io { what, source }
}

/// The OS user the PostgreSQL binaries run as, when it is not this process's.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running PostgreSQL cluster in a directory of its own; dropping it stops the server and
/// removes the directory.
#[derive(Debug)]
pub struct ThrowawayCluster {
    /// Holds `data/` (the cluster), `log` (the server's) and the server's Unix socket.
    dir: PathBuf,
    bindir: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
    /// `pg_ctl start` was run: drop must stop the server (it may be up even if the start failed).
    started: bool,
}

impl ThrowawayCluster {
    /// Makes, configures and starts a cluster. On failure nothing is left behind, and the error
    /// carries the end of `initdb`'s output or of the server log.
    pub fn start(options: ThrowawayOptions) -> Result<Self, ThrowawayError> {
        let bindir = match &options.bindir {
            Some(dir) => check_bindir(dir).map_err(ThrowawayError::NoBinaries)?,
            None => find_bindir()?,
        };
        let run_as = if is_root() { Some(postgres_user()?) } else { None };
        let dir = make_unique_dir()?;
        // From here on, drop cleans up whatever was made.
        let mut cluster = ThrowawayCluster { dir, bindir, run_as, port: 0, started: false };
        if let Some(user) = run_as {
            std::os::unix::fs::chown(&cluster.dir, Some(user.uid), Some(user.gid))
                .map_err(io_error(format!("chown {} to postgres", cluster.dir.display())))?;
        }
        cluster.initdb()?;
        let settings = cluster.configure(&options)?;
        cluster.start_server(&settings)?;
        Ok(cluster)
    }

    /// [`start`](Self::start) for a test, by the project's rule: where PostgreSQL cannot start,
    /// a test skips (`None`, with "skipped: …" on stderr), except on CI (`CI=true`), where it
    /// fails, so that CI never passes by skipping.
    pub fn start_for_test() -> Option<Self> {
        Self::start_for_test_with(ThrowawayOptions::default())
    }

    /// [`start_for_test`](Self::start_for_test) with options.
    pub fn start_for_test_with(options: ThrowawayOptions) -> Option<Self> {
        match Self::start(options) {
            Ok(cluster) => Some(cluster),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("PostgreSQL cannot start (CI=true: this fails rather than skips): {e}")
            }
            Err(e) => {
                eprintln!("skipped: PostgreSQL cannot start: {e}");
                None
            }
        }
    }

    /// The TCP port the server listens on (at [`host`](Self::host)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on.
    pub fn host(&self) -> &'static str {
        HOST
    }

    /// The cluster's data directory (gone once the cluster is dropped).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A tokio-postgres (libpq keyword/value) connection string for database `db` as the
    /// superuser `postgres`; no password (`trust`).
    pub fn connection_string(&self, db: &str) -> String {
        format!("host={HOST} port={} user=postgres dbname={}", self.port, quote_conninfo(db))
    }

    /// A client of database `db` as `user`, its connection driven by a task of its own (on the
    /// current tokio runtime); a connection that ends says so on stderr.
    pub async fn client(&self, db: &str, user: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let conn =
            format!("host={HOST} port={} user={} dbname={}", self.port, quote_conninfo(user), quote_conninfo(db));
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// `CREATE DATABASE` (with `psql`), so that a caller needs no client of its own to make one.
    pub fn create_database(&self, name: &str) -> Result<(), ThrowawayError> {
        let sql = format!("CREATE DATABASE {}", quote_identifier(name));
        let mut psql = Command::new(self.bindir.join("psql"));
        psql.args(["-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-U", "postgres", "-d", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(&sql);
        run(&mut psql, &format!("psql -c '{sql}'"))
    }

    /// The last lines of the server log, for an error message.
    pub fn log_tail(&self) -> String {
        match std::fs::read(self.dir.join("log")) {
            Ok(log) => tail(&log),
            Err(e) => format!("(no server log: {e})"),
        }
    }

    /// A command of the PostgreSQL binaries, as the user they must run as, in our directory (the
    /// `postgres` user may not enter the caller's working directory).
    fn pg_command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bindir.join(program));
        command.current_dir(&self.dir);
        if let Some(user) = self.run_as {
            // std drops root's supplementary groups when it changes the uid.
            command.uid(user.uid).gid(user.gid);
        }
        command
    }

    fn initdb(&self) -> Result<(), ThrowawayError> {
        let mut initdb = self.pg_command("initdb");
        // --no-sync: the cluster is thrown away, its initial files need not reach the disk.
        // --locale=C: no dependence on the locales the machine has.
        initdb
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--auth=trust", "--no-sync", "-D"])
            .arg(self.data_dir());
        run(&mut initdb, "initdb")
    }

    /// Our settings go to `imago.conf`, included at the end of `postgresql.conf`, so that each
    /// start attempt rewrites only them (with its port); `pg_hba.conf` is replaced. Returns the
    /// settings but the port.
    fn configure(&self, options: &ThrowawayOptions) -> Result<String, ThrowawayError> {
        let conf = self.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(io_error(format!("read {}", conf.display())))?;
        text.push_str("\ninclude 'imago.conf'\n");
        self.write_owned(&conf, &text)?;
        let hba = "# Written by ThrowawayCluster: trust on loopback and the socket, replication included.\n\
                   local all         all              trust\n\
                   local replication all              trust\n\
                   host  all         all 127.0.0.1/32 trust\n\
                   host  replication all 127.0.0.1/32 trust\n";
        self.write_owned(&self.data_dir().join("pg_hba.conf"), hba)?;
        let mut settings = vec![
            ("listen_addresses".to_string(), format!("'{HOST}'")),
            ("unix_socket_directories".to_string(), quote_setting(&self.dir.to_string_lossy())),
            ("wal_level".to_string(), "logical".to_string()),
            ("max_replication_slots".to_string(), "10".to_string()),
            ("max_wal_senders".to_string(), "10".to_string()),
            ("fsync".to_string(), if options.fsync { "on" } else { "off" }.to_string()),
            ("shared_buffers".to_string(), "'16MB'".to_string()),
            ("max_connections".to_string(), "40".to_string()),
        ];
        settings.extend(options.settings.iter().cloned());
        Ok(settings.iter().map(|(name, value)| format!("{name} = {value}\n")).collect())
    }

    /// Starts the server on a free port, trying another when the port was taken meanwhile (as
    /// the log of that attempt says).
    fn start_server(&mut self, settings: &str) -> Result<(), ThrowawayError> {
        let log_path = self.dir.join("log");
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            self.write_owned(&self.data_dir().join("imago.conf"), &format!("{settings}port = {port}\n"))?;
            let logged_before = std::fs::metadata(&log_path).map_or(0, |m| m.len());
            self.started = true;
            let mut pg_ctl = self.pg_command("pg_ctl");
            pg_ctl.args(["-w", "-t", "60", "-D"]).arg(self.data_dir()).arg("-l").arg(&log_path).arg("start");
            let output = pg_ctl.output().map_err(io_error("run pg_ctl start"))?;
            if output.status.success() {
                self.port = port;
                return Ok(());
            }
            last = format!("pg_ctl start: {}", describe(&output));
            let log = std::fs::read(&log_path).unwrap_or_default();
            let this_attempt = String::from_utf8_lossy(log.get(logged_before as usize..).unwrap_or_default());
            if !(this_attempt.contains("could not bind") || this_attempt.contains("Address already in use")) {
                return Err(ThrowawayError::Start { reason: last, log: self.log_tail() });
            }
        }
        Err(ThrowawayError::Start {
            reason: format!("no free port in {START_ATTEMPTS} attempts; {last}"),
            log: self.log_tail(),
        })
    }

    /// Writes a file the server reads, owned by the user it runs as (a umask of 077 would hide
    /// root's files from it).
    fn write_owned(&self, path: &Path, text: &str) -> Result<(), ThrowawayError> {
        std::fs::write(path, text).map_err(io_error(format!("write {}", path.display())))?;
        if let Some(user) = self.run_as {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                .map_err(io_error(format!("chown {} to postgres", path.display())))?;
        }
        Ok(())
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        if self.started {
            let mut pg_ctl = self.pg_command("pg_ctl");
            pg_ctl.args(["-w", "-t", "60", "-m", "immediate", "-D"]).arg(self.data_dir()).arg("stop");
            match pg_ctl.output() {
                Ok(output) if output.status.success() => {}
                // A start that failed leaves no server: pg_ctl says so, and that is fine.
                Ok(output) if String::from_utf8_lossy(&output.stderr).contains("PID file") => {}
                Ok(output) => eprintln!("throwaway cluster {}: pg_ctl stop: {}", self.dir.display(), describe(&output)),
                Err(e) => eprintln!("throwaway cluster {}: pg_ctl stop: {e}", self.dir.display()),
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("throwaway cluster: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// `IMAGO_PG_BINDIR`, else `pg_config --bindir`, else [`DEFAULT_BINDIR`]; the first that is set
/// must hold the binaries (a wrong `IMAGO_PG_BINDIR` is an error, not a fallback).
fn find_bindir() -> Result<PathBuf, ThrowawayError> {
    if let Some(dir) = std::env::var_os("IMAGO_PG_BINDIR") {
        return check_bindir(Path::new(&dir)).map_err(|e| ThrowawayError::NoBinaries(format!("IMAGO_PG_BINDIR: {e}")));
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if output.status.success() && !dir.is_empty() {
            if let Ok(dir) = check_bindir(Path::new(&dir)) {
                return Ok(dir);
            }
        }
    }
    check_bindir(Path::new(DEFAULT_BINDIR)).map_err(ThrowawayError::NoBinaries)
}

/// `dir` if it holds the binaries we run, else which one it lacks.
fn check_bindir(dir: &Path) -> Result<PathBuf, String> {
    for program in ["initdb", "pg_ctl", "postgres", "psql"] {
        if !dir.join(program).is_file() {
            return Err(format!("no {program} in {}", dir.display()));
        }
    }
    Ok(dir.to_path_buf())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The `postgres` user's uid and gid, asked of `id` (so that NSS users count too).
fn postgres_user() -> Result<RunAs, ThrowawayError> {
    let id = |flag: &str| -> Result<u32, ThrowawayError> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| ThrowawayError::NoPostgresUser(format!("id {flag} postgres: {e}")))?;
        let text = String::from_utf8_lossy(&output.stdout);
        match text.trim().parse() {
            Ok(n) if output.status.success() => Ok(n),
            _ => Err(ThrowawayError::NoPostgresUser(format!("id {flag} postgres: {}", describe(&output)))),
        }
    };
    Ok(RunAs { uid: id("-u")?, gid: id("-g")? })
}

/// A new directory `imago-pg-<pid>-<n>` in the temp dir; a name left over from an earlier
/// process with the same pid is skipped, never reused.
fn make_unique_dir() -> Result<PathBuf, ThrowawayError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::env::temp_dir();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("imago-pg-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error(format!("create {}", dir.display()))(e)),
        }
    }
}

/// A port that was free a moment ago: the kernel's pick for a listener on port 0, closed again.
fn free_port() -> Result<u16, ThrowawayError> {
    let listener = std::net::TcpListener::bind((HOST, 0)).map_err(io_error("bind a probe on 127.0.0.1:0"))?;
    let port = listener.local_addr().map_err(io_error("address of the probe"))?.port();
    Ok(port)
}

/// Runs `command`; an error carries the end of what it printed.
fn run(command: &mut Command, name: &str) -> Result<(), ThrowawayError> {
    let output = command.output().map_err(io_error(format!("run {name}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = output.stdout.clone();
    text.extend_from_slice(&output.stderr);
    Err(ThrowawayError::Command { command: name.to_string(), status: output.status.to_string(), output: tail(&text) })
}

fn describe(output: &Output) -> String {
    let mut text = output.stdout.clone();
    text.extend_from_slice(&output.stderr);
    format!("{}: {}", output.status, tail(&text).trim_end())
}

/// The last [`TAIL_LINES`] lines of `text` (lossy UTF-8).
fn tail(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// `"name"` with inner quotes doubled: an SQL identifier taken literally.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A `postgresql.conf` string value: single-quoted, inner quotes doubled.
fn quote_setting(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A connection-string value, quoted (backslash escapes) when it is empty or holds a space, a
/// quote or a backslash.
fn quote_conninfo(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_string();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_string_values_are_quoted_when_needed() {
        assert_eq!(quote_conninfo("app"), "app");
        assert_eq!(quote_conninfo("my db"), "'my db'");
        assert_eq!(quote_conninfo("it's\\"), "'it\\'s\\\\'");
        assert_eq!(quote_conninfo(""), "''");
    }

    #[test]
    fn identifiers_and_settings_are_quoted() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_setting("/tmp/o'k"), "'/tmp/o''k'");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let kept = tail(text.as_bytes());
        assert_eq!(kept.lines().count(), TAIL_LINES);
        assert!(kept.starts_with("line 70\n") && kept.ends_with("line 99"));
        assert_eq!(tail(b"only"), "only");
    }

    #[test]
    fn a_bindir_without_the_binaries_is_refused_by_name() {
        let e = check_bindir(Path::new("/nonexistent/imago")).unwrap_err();
        assert_eq!(e, "no initdb in /nonexistent/imago");
    }
}
