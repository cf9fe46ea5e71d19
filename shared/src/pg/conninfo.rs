//! Connection strings the libpq way, with the password kept apart.
//!
//! One parser reads both of libpq's forms — `postgresql://user:pw@h1:5432,h2/db?sslmode=…`
//! and `host=h user=u password='a b'` — into a [`ConnInfo`], which never holds a password:
//! it is what jobs store, print and send. The password, when the string carried one, comes
//! back beside it as a [`Secret`] that stays in the process it was given to. At connect
//! time [`Credentials`] find the password the way libpq does (the one given, then a
//! password file re-read at every connection, then `PGPASSWORD`, then the pgpass file).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

use super::Secret;

/// The libpq keywords haul understands, in the order they are printed. Any other keyword
/// is refused by name (libpq would refuse an unknown one too).
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "passfile",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslsni",
    "channel_binding",
    "options",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
];

/// libpq's environment variables for the non-secret keywords. They fill what a connection
/// string leaves out, where the user typed it (`PGPASSWORD` is read only when connecting).
const ENVIRONMENT: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSFILE", "passfile"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGSSLSNI", "sslsni"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGOPTIONS", "options"),
    ("PGAPPNAME", "application_name"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
];

/// A connection string that cannot be used, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DsnError(String);

/// libpq connection options without the password: safe to store, print and send.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConnInfo {
    params: BTreeMap<&'static str, String>,
}

impl ConnInfo {
    /// Parses either form of connection string, keeping the password apart.
    pub fn parse(s: &str) -> Result<(ConnInfo, Option<Secret>), DsnError> {
        let pairs = if let Some(rest) = s
            .strip_prefix("postgresql://")
            .or_else(|| s.strip_prefix("postgres://"))
        {
            parse_uri(rest)?
        } else {
            parse_keywords(s)?
        };
        let mut info = ConnInfo::default();
        let mut password = None;
        // a password with an unquoted space leaves its tail as another "option": never
        // show a word of such a string
        let has_password = pairs.iter().any(|(k, _)| k == "password");
        for (key, value) in pairs {
            if key == "password" {
                password = Some(Secret::new(value));
                continue;
            }
            info.set(&key, value).map_err(|e| {
                if has_password {
                    DsnError(
                        "the connection string has an option haul does not know (not shown: the string holds a password); single-quote a value that has spaces (password='a b'), or give the password in PGPASSWORD or a password file".into(),
                    )
                } else {
                    e
                }
            })?;
        }
        info.check()?;
        Ok((info, password))
    }

    /// As [`ConnInfo::parse`], then fills what the string left out from libpq's
    /// environment variables (`PGHOST`, `PGUSER`, `PGSSLMODE`, …), as `psql` would.
    pub fn from_user(s: &str) -> Result<(ConnInfo, Option<Secret>), DsnError> {
        Self::from_user_with(s, |k| std::env::var(k).ok())
    }

    pub fn from_user_with(
        s: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(ConnInfo, Option<Secret>), DsnError> {
        let (mut info, password) = Self::parse(s)?;
        for (var, key) in ENVIRONMENT {
            if !info.params.contains_key(key)
                && let Some(v) = env(var).filter(|v| !v.is_empty())
            {
                info.set(key, v)?;
            }
        }
        info.check()?;
        Ok((info, password))
    }

    /// Whether no option is given (`haul ... --resume` without `--source`: the job's
    /// own is used).
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// One option's value, as given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    fn set(&mut self, key: &str, value: String) -> Result<(), DsnError> {
        let Some(known) = KEYWORDS.iter().find(|k| **k == key) else {
            return Err(DsnError(match key {
                "service" => "connection option \"service\": haul does not read pg_service.conf; give the service's options in the connection string".into(),
                "sslpassword" | "sslcrl" | "sslcrldir" | "sslcompression" | "requiressl"
                | "ssl_min_protocol_version" | "ssl_max_protocol_version" | "sslnegotiation"
                | "gssencmode" | "krbsrvname" | "gsslib" | "requirepeer" | "load_balance_hosts"
                | "replication" | "require_auth" | "sslcertmode" => format!(
                    "connection option {key:?} is not supported by haul; remove it from the connection string"
                ),
                _ => format!("unknown connection option {key:?}"),
            }));
        };
        self.params.insert(known, value);
        Ok(())
    }

    /// Values that must be one of a few words, or numbers, checked before anything
    /// connects (libpq checks them at connect time, where a worker would retry them).
    fn check(&self) -> Result<(), DsnError> {
        let one_of = |key: &str, allowed: &[&str]| match self.get(key) {
            Some(v) if !allowed.contains(&v) => Err(DsnError(format!(
                "invalid {key} value {v:?}: use one of {}",
                allowed.join(", ")
            ))),
            _ => Ok(()),
        };
        one_of(
            "sslmode",
            &[
                "disable",
                "allow",
                "prefer",
                "require",
                "verify-ca",
                "verify-full",
            ],
        )?;
        one_of("sslsni", &["0", "1"])?;
        one_of("keepalives", &["0", "1"])?;
        one_of("channel_binding", &["disable", "prefer"]).map_err(|e| {
            DsnError(format!(
                "{e} (haul authenticates with SCRAM-SHA-256 without channel binding)"
            ))
        })?;
        one_of("target_session_attrs", &["any"]).map_err(|e| {
            DsnError(format!(
                "{e} (haul connects to the hosts in the order given: list the one to read from first)"
            ))
        })?;
        for key in [
            "connect_timeout",
            "keepalives_idle",
            "keepalives_interval",
            "keepalives_count",
            "tcp_user_timeout",
        ] {
            if let Some(v) = self.get(key)
                && v.trim().parse::<u64>().is_err()
            {
                return Err(DsnError(format!(
                    "invalid {key} value {v:?}: a number of seconds"
                )));
            }
        }
        if let Some(ports) = self.get("port") {
            for p in ports.split(',') {
                if !p.is_empty() && p.trim().parse::<u16>().is_err() {
                    return Err(DsnError(format!("invalid port {p:?}")));
                }
            }
        }
        if self.get("sslrootcert") == Some("system")
            && matches!(self.get("sslmode"), Some(m) if m != "verify-full")
        {
            return Err(DsnError(format!(
                "sslrootcert=system needs sslmode=verify-full (not {:?}): the system's CAs vouch for names, so the name must be checked",
                self.get("sslmode").unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// The hosts to try, in order: each with its port and, for verification, its name.
    pub fn targets(&self) -> Result<Vec<Target>, DsnError> {
        let split = |key: &str| -> Vec<String> {
            self.get(key)
                .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
                .unwrap_or_default()
        };
        let hosts = split("host");
        let addrs = split("hostaddr");
        let ports = split("port");
        if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
            return Err(DsnError(format!(
                "{} hosts but {} hostaddrs: give one hostaddr per host",
                hosts.len(),
                addrs.len()
            )));
        }
        let n = hosts.len().max(addrs.len()).max(1);
        if ports.len() > 1 && ports.len() != n {
            return Err(DsnError(format!(
                "{} ports for {n} hosts: give one port, or one per host",
                ports.len()
            )));
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let port = match ports.get(i).or(ports.first()).map(String::as_str) {
                None | Some("") => 5432,
                Some(p) => p
                    .parse()
                    .map_err(|_| DsnError(format!("invalid port {p:?}")))?,
            };
            let addr = match addrs.get(i).map(String::as_str) {
                None | Some("") => None,
                Some(a) => Some(
                    a.parse()
                        .map_err(|_| DsnError(format!("invalid hostaddr {a:?}")))?,
                ),
            };
            let host = match hosts.get(i).map(String::as_str) {
                Some(h) if !h.is_empty() => Some(h.to_owned()),
                _ if addr.is_some() => None,
                _ => Some(default_socket_dir()),
            };
            out.push(Target { host, addr, port });
        }
        Ok(out)
    }

    /// The user to log in as: `user`, or the operating system's user (libpq's default).
    pub fn user(&self) -> Result<String, DsnError> {
        match self.get("user") {
            Some(u) if !u.is_empty() => Ok(u.to_owned()),
            _ => std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .map_err(|_| {
                    DsnError(
                        "no user to connect as: give user= in the connection string or set PGUSER"
                            .into(),
                    )
                }),
        }
    }

    /// The database: `dbname`, or the user's name (libpq's default).
    pub fn dbname(&self) -> Result<String, DsnError> {
        match self.get("dbname") {
            Some(d) if !d.is_empty() => Ok(d.to_owned()),
            _ => self.user(),
        }
    }

    /// The same options with some replaced (`None` removes one).
    pub fn with(&self, key: &str, value: Option<&str>) -> Result<ConnInfo, DsnError> {
        let mut out = self.clone();
        match value {
            Some(v) => out.set(key, v.to_owned())?,
            None => {
                out.params.remove(key);
            }
        }
        out.check()?;
        Ok(out)
    }
}

/// Where one of a connection string's hosts is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// A host name, an IP address, or a Unix socket directory (starts with `/`); `None`
    /// when only `hostaddr` was given.
    pub host: Option<String>,
    pub addr: Option<std::net::IpAddr>,
    pub port: u16,
}

impl Target {
    /// The socket path when this host is a Unix socket directory.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match (&self.host, self.addr) {
            (Some(h), None) if h.starts_with('/') || h.starts_with('@') => {
                Some(Path::new(h).join(format!(".s.PGSQL.{}", self.port)))
            }
            _ => None,
        }
    }

    /// The name pgpass lines and certificate checks match: the host, `localhost` for a
    /// socket (libpq's rule), or the address.
    pub fn name(&self) -> String {
        match (&self.host, self.addr) {
            (Some(h), _) if h.starts_with('/') || h.starts_with('@') => "localhost".into(),
            (Some(h), _) => h.clone(),
            (None, Some(a)) => a.to_string(),
            (None, None) => "localhost".into(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, self.addr) {
            (Some(h), _) if self.socket_path().is_some() => write!(f, "{h} (port {})", self.port),
            (Some(h), _) => write!(f, "{h}:{}", self.port),
            (None, Some(a)) => write!(f, "{a}:{}", self.port),
            (None, None) => write!(f, "localhost:{}", self.port),
        }
    }
}

/// libpq's default socket directory on Debian, else the upstream default.
fn default_socket_dir() -> String {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql".into()
    } else {
        "/tmp".into()
    }
}

/// A database and how this process logs in to it.
#[derive(Clone, Debug)]
pub struct Database {
    pub info: ConnInfo,
    pub creds: Credentials,
}

impl Database {
    /// From a connection string as the user typed it: libpq's environment fills what it
    /// leaves out, a password in it stays with this process, and `password_file` is read
    /// at every connection.
    pub fn from_user(dsn: &str, password_file: Option<PathBuf>) -> Result<Self, DsnError> {
        let (info, password) = ConnInfo::from_user(dsn)?;
        Ok(Self {
            info,
            creds: Credentials {
                password,
                password_file,
            },
        })
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.info.fmt(f)
    }
}

/// `key=value` pairs, each quoted when it needs it; never a password.
impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for key in KEYWORDS {
            if let Some(v) = self.params.get(key) {
                if !first {
                    f.write_str(" ")?;
                }
                first = false;
                write!(f, "{key}={}", quote_value(v))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({self})")
    }
}

/// Parsing a stored form; a password in it is refused (stored forms never hold one).
impl FromStr for ConnInfo {
    type Err = DsnError;
    fn from_str(s: &str) -> Result<Self, DsnError> {
        match ConnInfo::parse(s)? {
            (info, None) => Ok(info),
            (_, Some(_)) => Err(DsnError(
                "a stored connection string holds a password".into(),
            )),
        }
    }
}

impl Serialize for ConnInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConnInfo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // a record written before passwords were kept apart: drop the password
        ConnInfo::parse(&s)
            .map(|(info, _)| info)
            .map_err(serde::de::Error::custom)
    }
}

fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_owned();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `key = value` pairs as libpq reads them: whitespace around `=` allowed; a value either
/// single-quoted (with `\'` and `\\`) or running to the next whitespace.
fn parse_keywords(s: &str) -> Result<Vec<(String, String)>, DsnError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // the word is not shown: it may be the tail of a password with a space
            return Err(DsnError(
                "a word of the connection string has no \"=\": use key=value pairs (single-quote a value that has spaces: password='a b') or a postgresql:// URL".into(),
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(DsnError(format!(
                            "unterminated quoted value for {key:?} in the connection string"
                        )));
                    }
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// The rest of a `postgresql://` URL: `[user[:password]@][host[:port][,…]][/dbname][?k=v&…]`.
fn parse_uri(rest: &str) -> Result<Vec<(String, String)>, DsnError> {
    let decode = |s: &str, what: &str| -> Result<String, DsnError> {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| DsnError(format!("the URL's {what} is not valid UTF-8 once decoded")))
    };
    // a '/', '?' or '#' before the last '@' is in the credentials (unless it starts a
    // query that has an '@' in a value): unencoded, it would split the URL there, and
    // pieces of the password would be read as port and database, and shown
    if let Some(at) = rest.rfind('@') {
        let creds = &rest[..at];
        if let Some(i) = creds.find(['/', '?', '#'])
            && !creds[i..].contains('=')
        {
            return Err(DsnError(
                "the URL has a '/', '?' or '#' before its last '@': percent-encode them in a user or password (%2F, %3F, %23), or give the password in PGPASSWORD or a password file".into(),
            ));
        }
    }
    let mut out = Vec::new();
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (before_query, None),
    };
    // the last '@' ends the credentials, so a password with a raw '@' stays whole
    let hostspec = match authority.rfind('@') {
        Some(at) => {
            let creds = &authority[..at];
            let (user, password) = match creds.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (creds, None),
            };
            if !user.is_empty() {
                out.push(("user".into(), decode(user, "user")?));
            }
            if let Some(p) = password {
                out.push(("password".into(), decode(p, "password")?));
            }
            &authority[at + 1..]
        }
        None => authority,
    };
    if !hostspec.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for spec in hostspec.split(',') {
            let (host, port) = if let Some(v6) = spec.strip_prefix('[') {
                let (h, after) = v6.split_once(']').ok_or_else(|| {
                    DsnError(format!(
                        "unterminated IPv6 address in the URL's host {spec:?}"
                    ))
                })?;
                (h, after.strip_prefix(':'))
            } else {
                match spec.split_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (spec, None),
                }
            };
            hosts.push(decode(host, "host")?);
            ports.push(port.unwrap_or("").to_owned());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            out.push(("host".into(), hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".into(), decode(db, "database name")?));
    }
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            DsnError(format!(
                "missing \"=\" in the URL's parameter {:?}",
                decode(pair, "parameter").unwrap_or_default()
            ))
        })?;
        let (k, v) = (decode(k, "parameter")?, decode(v, "parameter")?);
        // JDBC's spelling, which libpq accepts too
        if k == "ssl" && v == "true" {
            out.push(("sslmode".into(), "require".into()));
        } else {
            out.push((k, v));
        }
    }
    Ok(out)
}

/// Where a password came from, named in errors (never the password itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    ConnectionString,
    File(PathBuf),
    Environment,
    Passfile(PathBuf),
}

impl fmt::Display for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordSource::ConnectionString => f.write_str("the connection string"),
            PasswordSource::File(p) => write!(f, "the password file {}", p.display()),
            PasswordSource::Environment => f.write_str("PGPASSWORD"),
            PasswordSource::Passfile(p) => write!(f, "the pgpass file {}", p.display()),
        }
    }
}

/// How a process finds the password for a connection: its own configuration, never a job.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// A password the process was given in its connection string (`haul run`, a loader's
    /// `--target`).
    pub password: Option<Secret>,
    /// A file holding the password, read again at every connection, so a rotated secret
    /// or a short-lived token (RDS IAM) works for a job that runs for hours.
    pub password_file: Option<PathBuf>,
}

impl Credentials {
    pub fn from_file(password_file: Option<PathBuf>) -> Self {
        Self {
            password: None,
            password_file,
        }
    }

    /// The password for `user` on `db` at `target`, and where it came from: the one given,
    /// the password file, `PGPASSWORD`, then the pgpass file (`passfile`, `PGPASSFILE` or
    /// `~/.pgpass`), as libpq looks.
    pub fn password_for(
        &self,
        info: &ConnInfo,
        target: &Target,
        db: &str,
        user: &str,
    ) -> Result<Option<(Secret, PasswordSource)>, DsnError> {
        if let Some(p) = &self.password {
            return Ok(Some((p.clone(), PasswordSource::ConnectionString)));
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                DsnError(format!(
                    "cannot read the password file {}: {e}",
                    path.display()
                ))
            })?;
            let pw = text.trim_end_matches(['\n', '\r']);
            if pw.is_empty() {
                return Err(DsnError(format!(
                    "the password file {} is empty",
                    path.display()
                )));
            }
            return Ok(Some((Secret::new(pw), PasswordSource::File(path.clone()))));
        }
        if let Ok(pw) = std::env::var("PGPASSWORD")
            && !pw.is_empty()
        {
            return Ok(Some((Secret::new(pw), PasswordSource::Environment)));
        }
        let passfile = info
            .get("passfile")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("PGPASSFILE").map(PathBuf::from))
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")));
        let Some(passfile) = passfile else {
            return Ok(None);
        };
        let Ok(text) = std::fs::read_to_string(&passfile) else {
            return Ok(None);
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(&passfile)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %passfile.display(),
                    "the pgpass file has group or world access and is ignored (as libpq does); chmod 600 it"
                );
                return Ok(None);
            }
        }
        let port = target.port.to_string();
        Ok(pgpass_lookup(&text, &target.name(), &port, db, user)
            .map(|pw| (Secret::new(pw), PasswordSource::Passfile(passfile))))
    }
}

/// The password of the first pgpass line (`host:port:db:user:password`, `*` matching
/// anything, `\` escaping `:` and `\`) that matches.
fn pgpass_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if matches(&fields[0], host)
            && matches(&fields[1], port)
            && matches(&fields[2], db)
            && matches(&fields[3], user)
        {
            return fields.pop();
        }
    }
    None
}

/// A string that may hold a secret, for logs and messages: a connection string shows
/// without its password, a URL without its userinfo password or `password=` parameter,
/// anything else (a token) as `***`.
pub fn redact(s: &str) -> String {
    let postgres_url = s.starts_with("postgresql://") || s.starts_with("postgres://");
    if postgres_url || (!s.contains("://") && s.contains('=')) {
        return match ConnInfo::parse(s) {
            Ok((info, Some(_))) => format!("{info} password=***"),
            Ok((info, None)) => info.to_string(),
            Err(_) => "***".into(),
        };
    }
    match url::Url::parse(s) {
        Ok(mut u) if u.has_host() => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let secret = ["password", "pass", "token", "secret"]
                        .contains(&k.to_ascii_lowercase().as_str());
                    (
                        k.into_owned(),
                        if secret { "***".into() } else { v.into_owned() },
                    )
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        _ => "***".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> (String, Option<String>) {
        let (info, pw) = ConnInfo::parse(s).unwrap();
        (info.to_string(), pw.map(|p| p.expose().to_owned()))
    }

    /// Regression: an unencoded '/' in a URL's password was read as port and database
    /// and echoed in errors; an unquoted space in a keyword password echoed its tail.
    #[test]
    fn a_password_is_never_echoed_by_a_parse_error() {
        for (dsn, secret) in [
            ("postgresql://etl:5432/Xy9+Qz@h/db", "Xy9+Qz"),
            ("postgresql://etl:a?b@h/db", "a?b"),
            ("postgresql://etl:a#b@h/db", "a#b"),
            ("host=h password=correct horse", "horse"),
            ("host=h password=correct horse=battery", "battery"),
        ] {
            let e = ConnInfo::parse(dsn)
                .err()
                .unwrap_or_else(|| panic!("{dsn} parsed"));
            let msg = e.to_string();
            assert!(
                !msg.contains(secret) && !msg.contains("5432"),
                "{dsn}: {msg}"
            );
        }
        let e = ConnInfo::parse("postgresql://etl:5432/Xy9+Qz@h/db").unwrap_err();
        assert!(e.to_string().contains("%2F"), "{e}");
        // encoded, or an '@' in a query value, it parses
        let (info, pw) = ConnInfo::parse("postgresql://etl:5432%2FXy9+Qz@h/db").unwrap();
        assert_eq!(info.get("dbname"), Some("db"));
        assert!(pw.is_some());
        let (info, _) = ConnInfo::parse("postgresql://h/db?user=a@b.example").unwrap();
        assert_eq!(info.get("user"), Some("a@b.example"));
    }

    #[test]
    fn both_forms_keep_the_password_apart() {
        assert_eq!(
            parse("postgresql://etl:s3cr%40t@db.prod:5433/shop?sslmode=verify-full&sslrootcert=/etc/ca.pem"),
            (
                "host=db.prod port=5433 dbname=shop user=etl sslmode=verify-full sslrootcert=/etc/ca.pem".into(),
                Some("s3cr@t".into())
            )
        );
        // a raw '@' in the password does not leak its tail into the host
        assert_eq!(
            parse("postgresql://bob:s3cr@t@db/app").1,
            Some("s3cr@t".into())
        );
        assert_eq!(
            parse("postgresql://bob@db/app?password=hunter2"),
            ("host=db dbname=app user=bob".into(), Some("hunter2".into()))
        );
        assert_eq!(
            parse("host=db   password = hunter2 user=bob"),
            ("host=db user=bob".into(), Some("hunter2".into()))
        );
        assert_eq!(
            parse(r"host=db password='a b\'c' dbname='my db'"),
            ("host=db dbname='my db'".into(), Some("a b'c".into()))
        );
        assert_eq!(
            parse("postgresql://[::1]:5432,h2:5433/db"),
            ("host=::1,h2 port=5432,5433 dbname=db".into(), None)
        );
        assert_eq!(
            parse("postgresql://%2Fvar%2Frun%2Fpostgresql/db?ssl=true"),
            (
                "host=/var/run/postgresql dbname=db sslmode=require".into(),
                None
            )
        );
        assert_eq!(parse("").0, "");
    }

    #[test]
    fn the_printed_form_parses_back_to_the_same_options() {
        for s in [
            r"host=db dbname='it\'s' user='a b' options='-c x=\\y'",
            "postgresql://u@h:1/d?application_name=x%20y&sslmode=require",
        ] {
            let (info, _) = ConnInfo::parse(s).unwrap();
            let again: ConnInfo = info.to_string().parse().unwrap();
            assert_eq!(again, info, "{s}");
        }
    }

    #[test]
    fn bad_strings_are_refused_in_one_line() {
        for (s, want) in [
            ("host=db sslmode=verify", "invalid sslmode value \"verify\""),
            (
                "host=db gssencmode=prefer",
                "\"gssencmode\" is not supported",
            ),
            ("host=db bogus=1", "unknown connection option \"bogus\""),
            ("host=db password='x", "unterminated quoted value"),
            ("shop", "a word of the connection string has no \"=\""),
            ("host=db port=54x", "invalid port"),
            (
                "host=db sslmode=require sslrootcert=system",
                "sslrootcert=system needs sslmode=verify-full",
            ),
            ("host=db channel_binding=require", "without channel binding"),
        ] {
            let err = ConnInfo::parse(s).unwrap_err().to_string();
            assert!(err.contains(want), "{s}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn environment_fills_what_the_string_leaves_out() {
        let env = |k: &str| match k {
            "PGHOST" => Some("envhost".to_owned()),
            "PGSSLMODE" => Some("verify-full".to_owned()),
            "PGPASSWORD" => Some("never-folded".to_owned()),
            _ => None,
        };
        let (info, pw) = ConnInfo::from_user_with("host=db dbname=x", env).unwrap();
        assert_eq!(info.to_string(), "host=db dbname=x sslmode=verify-full");
        assert!(pw.is_none());
    }

    #[test]
    fn targets_pair_hosts_ports_and_addresses() {
        let (info, _) = ConnInfo::parse("host=a,b port=5433 hostaddr=10.0.0.1,10.0.0.2").unwrap();
        let t = info.targets().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].name(), "b");
        assert_eq!(t[1].port, 5433);
        assert_eq!(t[1].addr, Some("10.0.0.2".parse().unwrap()));
        let (sock, _) = ConnInfo::parse("host=/run/pg port=5444").unwrap();
        let t = sock.targets().unwrap();
        assert_eq!(t[0].name(), "localhost");
        assert_eq!(
            t[0].socket_path().unwrap(),
            Path::new("/run/pg/.s.PGSQL.5444")
        );
    }

    #[test]
    fn pgpass_lines_match_like_libpq() {
        let text = "# comment\nother:*:*:*:no\ndb:5432:shop:etl:pa\\:ss\n*:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "db", "5432", "shop", "etl"),
            Some("pa:ss".into())
        );
        assert_eq!(
            pgpass_lookup(text, "db", "5433", "shop", "etl"),
            Some("fallback".into())
        );
        assert_eq!(pgpass_lookup("h:1:d:u:p", "x", "1", "d", "u"), None);
    }

    #[test]
    fn the_password_file_is_read_again_at_every_connection() {
        let file = std::env::temp_dir().join(format!("haul-pw-{}", std::process::id()));
        let creds = Credentials::from_file(Some(file.clone()));
        let (info, _) = ConnInfo::parse("host=db user=u dbname=d").unwrap();
        let target = &info.targets().unwrap()[0];
        let read = || {
            let (pw, from) = creds
                .password_for(&info, target, "d", "u")
                .unwrap()
                .unwrap();
            assert_eq!(from, PasswordSource::File(file.clone()));
            pw.expose().to_owned()
        };
        std::fs::write(&file, "token-1\n").unwrap();
        assert_eq!(read(), "token-1");
        // rotated (a short-lived token renewed by a sidecar): the next connection sees it
        std::fs::write(&file, "token-2\n").unwrap();
        assert_eq!(read(), "token-2");
        std::fs::remove_file(&file).unwrap();
        let err = creds.password_for(&info, target, "d", "u").unwrap_err();
        assert!(
            err.to_string().contains("cannot read the password file"),
            "{err}"
        );
    }

    #[test]
    fn redaction_hides_every_spelling_of_a_password() {
        for s in [
            "postgresql://bob:hunter2@db/app",
            "postgresql://bob@db/app?password=hunter2",
            "host=db password = hunter2",
            "host=db password='hunter2 and more'",
            "amqp://guest:hunter2@mq:5672/%2f",
            "rediss://:hunter2@cache:6380/",
            "https://x/?token=hunter2",
            "hunter2",
        ] {
            let r = redact(s);
            assert!(!r.contains("hunter2") && !r.contains("more"), "{s} -> {r}");
        }
        assert_eq!(
            redact("amqp://guest:pw@mq:5672/%2f"),
            "amqp://guest:***@mq:5672/%2f"
        );
        assert_eq!(redact("host=db user=bob"), "host=db user=bob");
    }
}
