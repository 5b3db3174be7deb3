//! Bearer tokens: the token file, roles, the constant-time check and the SIGHUP reload.
//!
//! The token file has one token per line, `NAME ROLE TOKEN` separated by whitespace; `#` starts
//! a comment; ROLE is `read`, `admin` or `eval` (admin, and evaluating expressions in Node.js targets when the agent runs with `--allow-eval`); NAME (1-64 of `A-Za-z0-9._-`) is what the audit log
//! shows. Tokens are 16-256 printable ASCII characters without whitespace or `#`. The file must
//! be a regular file that neither group nor others may access (mode 0600 or 0400), else the
//! agent refuses to start and a reload is refused.
//!
//! Tokens are never logged, never echoed in an error (errors name the line number only) and
//! never accepted on the command line. A presented token is compared with every known token in
//! constant time ([`subtle`]), without stopping at the first match, over a fixed-length padded
//! buffer so the comparison time does not depend on where the tokens differ or on their length.
use std::{
    fmt,
    fs::File,
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use subtle::{ConditionallySelectable, ConstantTimeEq};
use tracing::{info, warn};

/// Shortest token accepted in the file.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted in the file (and the padded comparison length).
pub const MAX_TOKEN_LEN: usize = 256;
/// Largest token file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// What a token may do. `Admin` may do everything `Read` may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Fetch reports, metrics and snapshots.
    Read,
    /// Also attach, detach, take and delete snapshots, change settings.
    Admin,
    /// Also evaluate expressions in Node.js targets (only when the agent runs with
    /// `--allow-eval`).
    Eval,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
            Role::Eval => "eval",
        }
    }

    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

/// Who made a request: the token's name and role (never the token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading token file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} has mode {mode:04o}: it must not be readable by group or others (chmod 600 {path})")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("token file {path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("token file {path} is larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("token file {path}, line {line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: &'static str },
    #[error("token file {path} holds no token")]
    Empty { path: PathBuf },
}

/// Why a request was not authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <token>`.
    Malformed,
    /// A token that is not in the file.
    Invalid,
}

impl AuthFailure {
    pub fn code(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_token",
            AuthFailure::Malformed => "malformed_authorization",
            AuthFailure::Invalid => "invalid_token",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => "this route needs an `Authorization: Bearer <token>` header",
            AuthFailure::Malformed => "the Authorization header must be `Bearer <token>`",
            AuthFailure::Invalid => "unknown token",
        }
    }
}

struct TokenEntry {
    name: String,
    role: Role,
    /// The token, zero-padded to `MAX_TOKEN_LEN`.
    padded: [u8; MAX_TOKEN_LEN],
    len: u64,
}

/// A parsed token file.
pub struct TokenSet {
    entries: Vec<TokenEntry>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names and roles only: never the tokens.
        f.debug_list().entries(self.entries.iter().map(|e| (&e.name, e.role))).finish()
    }
}

fn pad(token: &[u8]) -> ([u8; MAX_TOKEN_LEN], u64) {
    let mut out = [0u8; MAX_TOKEN_LEN];
    let n = token.len().min(MAX_TOKEN_LEN);
    out[..n].copy_from_slice(&token[..n]);
    (out, token.len() as u64)
}

impl TokenSet {
    /// Parses the file's text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<TokenSet, AuthError> {
        let err = |line: usize, reason: &'static str| AuthError::Line { path: path.to_owned(), line, reason };
        let mut entries: Vec<TokenEntry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("");
            let fields: Vec<&str> = content.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            let [name, role, token] = fields[..] else {
                return Err(err(line, "expected `NAME ROLE TOKEN`"));
            };
            let name_ok = name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !name_ok {
                return Err(err(line, "NAME must be 1-64 of A-Z, a-z, 0-9, '.', '_', '-'"));
            }
            let role = match role {
                "read" => Role::Read,
                "admin" => Role::Admin,
                "eval" => Role::Eval,
                _ => return Err(err(line, "ROLE must be `read`, `admin` or `eval`")),
            };
            if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN {
                return Err(err(line, "TOKEN must be 16 to 256 characters long"));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(line, "TOKEN must be printable ASCII"));
            }
            if entries.iter().any(|e| e.name == name) {
                return Err(err(line, "NAME used twice"));
            }
            let (padded, len) = pad(token.as_bytes());
            if entries.iter().any(|e| bool::from(e.padded.ct_eq(&padded) & e.len.ct_eq(&len))) {
                return Err(err(line, "TOKEN used twice"));
            }
            entries.push(TokenEntry { name: name.to_owned(), role, padded, len });
        }
        if entries.is_empty() {
            return Err(AuthError::Empty { path: path.to_owned() });
        }
        Ok(TokenSet { entries })
    }

    /// Reads and parses a token file after checking it is a regular file that only its owner
    /// may access. The mode is checked on the opened file, not on the path.
    pub fn load(path: &Path) -> Result<TokenSet, AuthError> {
        let io = |source| AuthError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(AuthError::NotRegular { path: path.to_owned() });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuthError::Permissions { path: path.to_owned(), mode });
        }
        if meta.size() > MAX_FILE_BYTES {
            return Err(AuthError::TooLarge { path: path.to_owned() });
        }
        let mut text = String::new();
        file.take(MAX_FILE_BYTES).read_to_string(&mut text).map_err(io)?;
        TokenSet::parse(&text, path)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finds the token. Compares against every entry, in constant time, without an early exit.
    pub fn check(&self, presented: &[u8]) -> Option<Principal> {
        let (padded, len) = pad(presented);
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, e) in self.entries.iter().enumerate() {
            let hit = e.padded.ct_eq(&padded) & e.len.ct_eq(&len);
            index.conditional_assign(&(i as u32), hit);
            found |= hit;
        }
        if bool::from(found) {
            let e = &self.entries[index as usize];
            Some(Principal { name: e.name.clone(), role: e.role })
        } else {
            None
        }
    }
}

/// Extracts the token from an `Authorization` header value: `Bearer <token>`, the scheme
/// case-insensitive, exactly one space-separated token of printable ASCII.
pub fn bearer(header: Option<&[u8]>) -> Result<&[u8], AuthFailure> {
    let value = header.ok_or(AuthFailure::Missing)?;
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return Err(AuthFailure::Malformed);
    }
    let token = &value[7..];
    let token = token.strip_prefix(b" ").unwrap_or(token);
    if token.is_empty() || token.len() > 4 * MAX_TOKEN_LEN || !token.iter().all(u8::is_ascii_graphic) {
        return Err(AuthFailure::Malformed);
    }
    Ok(token)
}

/// The live token set of the agent, re-read from its file on SIGHUP.
pub struct Auth {
    path: PathBuf,
    tokens: RwLock<Arc<TokenSet>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Auth {
    /// Loads the token file; the agent refuses to start when this fails.
    pub fn load(path: &Path) -> Result<Auth, AuthError> {
        let tokens = TokenSet::load(path)?;
        Ok(Auth { path: path.to_owned(), tokens: RwLock::new(Arc::new(tokens)) })
    }

    /// A token set not backed by a file (tests).
    pub fn from_set(tokens: TokenSet) -> Auth {
        Auth { path: PathBuf::new(), tokens: RwLock::new(Arc::new(tokens)) }
    }

    /// Re-reads the token file. When the new file is invalid the old set stays in force and
    /// the reason is logged (and returned). Returns the number of tokens now in force.
    pub fn reload(&self) -> Result<usize, AuthError> {
        match TokenSet::load(&self.path) {
            Ok(set) => {
                let n = set.len();
                *self.tokens.write().unwrap() = Arc::new(set);
                info!(target: "audit", tokens = n, "token file reloaded");
                Ok(n)
            }
            Err(e) => {
                warn!(target: "audit", error = %e, "token file reload refused; keeping the previous tokens");
                Err(e)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Authenticates an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Principal, AuthFailure> {
        let token = bearer(header)?;
        let set = self.tokens.read().unwrap().clone();
        set.check(token).ok_or(AuthFailure::Invalid)
    }
}

/// Re-reads the token file each time the process receives SIGHUP.
pub fn spawn_sighup_reload(auth: Arc<Auth>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let auth = auth.clone();
            // A small file read; keep it off the async workers anyway.
            let _ = tokio::task::spawn_blocking(move || auth.reload()).await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, io::Write};

    const READ_TOKEN: &str = "r3ad-t0ken-abcdefghijkl";
    const ADMIN_TOKEN: &str = "adm1n-t0ken-abcdefghijkl";

    fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        let mut f = fs::File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn sample() -> String {
        format!("# name role token\nci read {READ_TOKEN}  # the CI job\n\n  oncall\tadmin {ADMIN_TOKEN}\n")
    }

    /// The documented format parses: comments, blank lines, tabs; roles are found by token.
    #[test]
    fn parses_and_checks_tokens() {
        let set = TokenSet::parse(&sample(), Path::new("t")).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.check(READ_TOKEN.as_bytes()), Some(Principal { name: "ci".into(), role: Role::Read }));
        assert_eq!(set.check(ADMIN_TOKEN.as_bytes()).unwrap().role, Role::Admin);
        assert_eq!(set.check(b"r3ad-t0ken-abcdefghijk"), None, "a prefix is not the token");
        assert_eq!(set.check(format!("{READ_TOKEN}x").as_bytes()), None, "an extension is not the token");
        assert_eq!(set.check(b""), None);
        assert_eq!(set.check(&[b'a'; 2000]), None);
        assert!(!format!("{set:?}").contains(READ_TOKEN), "Debug must not show tokens");
    }

    /// Bad lines are refused with the line number, and the error never shows the token.
    #[test]
    fn bad_files_are_refused_without_echoing_tokens() {
        let p = Path::new("tokens");
        let cases = [
            (format!("ci read {READ_TOKEN} extra"), 1),
            (format!("ci write {READ_TOKEN}"), 1),
            ("ci read short".to_string(), 1),
            (format!("ci read {READ_TOKEN}\nci admin {ADMIN_TOKEN}"), 2),
            (format!("ci read {READ_TOKEN}\nops admin {READ_TOKEN}"), 2),
            (format!("c/i read {READ_TOKEN}"), 1),
        ];
        for (text, line) in cases {
            let err = TokenSet::parse(&text, p).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, AuthError::Line { line: l, .. } if l == line), "{msg}");
            assert!(!msg.contains(READ_TOKEN) && !msg.contains(ADMIN_TOKEN), "{msg}");
        }
        assert!(matches!(TokenSet::parse("# nothing\n", p), Err(AuthError::Empty { .. })));
    }

    /// A token file that group or others may read is refused with one clear line.
    #[test]
    fn group_or_world_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "tokens", &sample(), 0o644);
        let err = TokenSet::load(&path).unwrap_err();
        assert!(matches!(err, AuthError::Permissions { mode: 0o644, .. }));
        let msg = err.to_string();
        assert!(msg.contains("0644") && msg.contains("chmod 600") && !msg.contains('\n'), "{msg}");
        let path = write_file(dir.path(), "tokens2", &sample(), 0o640);
        assert!(TokenSet::load(&path).is_err());
        let path = write_file(dir.path(), "tokens3", &sample(), 0o600);
        assert_eq!(TokenSet::load(&path).unwrap().len(), 2);
        assert!(matches!(TokenSet::load(dir.path()), Err(AuthError::NotRegular { .. })));
    }

    /// Reload swaps in a valid new file, and keeps the old tokens when the new file is invalid
    /// (bad content or bad mode).
    #[test]
    fn reload_keeps_old_set_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "tokens", &sample(), 0o600);
        let auth = Auth::load(&path).unwrap();
        let hdr = |t: &str| format!("Bearer {t}");
        assert!(auth.authenticate(Some(hdr(READ_TOKEN).as_bytes())).is_ok());

        let new_token = "n3w-t0ken-abcdefghijklmn";
        write_file(dir.path(), "tokens", &format!("fresh admin {new_token}\n"), 0o600);
        assert_eq!(auth.reload().unwrap(), 1);
        assert_eq!(auth.authenticate(Some(hdr(READ_TOKEN).as_bytes())), Err(AuthFailure::Invalid));
        assert_eq!(auth.authenticate(Some(hdr(new_token).as_bytes())).unwrap().name, "fresh");

        write_file(dir.path(), "tokens", "garbage line\n", 0o600);
        assert!(auth.reload().is_err());
        assert_eq!(auth.authenticate(Some(hdr(new_token).as_bytes())).unwrap().name, "fresh");

        write_file(dir.path(), "tokens", &sample(), 0o644);
        assert!(matches!(auth.reload(), Err(AuthError::Permissions { .. })));
        assert_eq!(auth.authenticate(Some(hdr(new_token).as_bytes())).unwrap().name, "fresh");
        fs::remove_file(&path).unwrap();
        assert!(auth.reload().is_err());
        assert_eq!(auth.len(), 1);
    }

    /// Only `Bearer <token>` is accepted; the scheme is case-insensitive.
    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer(None), Err(AuthFailure::Missing));
        assert_eq!(bearer(Some(b"Bearer abc")), Ok(&b"abc"[..]));
        assert_eq!(bearer(Some(b"bearer abc")), Ok(&b"abc"[..]));
        for bad in [&b"Basic abc"[..], b"Bearer", b"Bearer ", b"Bearer a b", b"Token abc", b"Bearer \x01"] {
            assert_eq!(bearer(Some(bad)), Err(AuthFailure::Malformed), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
