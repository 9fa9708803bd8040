//! Optional TLS and basic auth for /metrics, from a Prometheus-style web
//! configuration file (the `web.yml` of Prometheus' exporter-toolkit), so the
//! file an operator already keeps for node_exporter works here too:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/activesync-monitor/tls.crt
//!   key_file: /etc/activesync-monitor/tls.key
//! basic_auth_users:
//!   prometheus: $2y$10$...   # bcrypt hash
//! ```
//!
//! Fields this agent does not implement (client certificates, cipher
//! choices, HTTP headers) are errors naming the field, never ignored.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine as _;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("reading the web configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the web configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("web configuration {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

/// What /metrics requires of its clients.
#[derive(Clone, Default)]
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// user -> bcrypt hash.
    users: BTreeMap<String, String>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: File = serde_norway::from_str(&text).map_err(|e| WebConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| WebConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        // Relative certificate paths are relative to the file, as in exporter-toolkit.
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            Some(t) => Some(Arc::new(
                server_config(&base.join(&t.cert_file), &base.join(&t.key_file))
                    .map_err(invalid)?,
            )),
            None => None,
        };
        for (user, hash) in &file.basic_auth_users {
            if !hash.starts_with("$2") {
                return Err(invalid(format!(
                    "basic_auth_users.{user}: not a bcrypt hash (make one with `htpasswd -nBC 10 {user}`)"
                )));
            }
        }
        Ok(WebConfig {
            tls,
            users: file.basic_auth_users,
        })
    }

    /// " (TLS)", " (basic auth)", both or nothing: for the start-up log.
    pub fn describe(&self) -> String {
        let tls = if self.tls.is_some() { " (TLS)" } else { "" };
        let auth = if self.requires_auth() {
            " (basic auth)"
        } else {
            ""
        };
        format!("{tls}{auth}")
    }

    pub fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Does this `Authorization` header value name a user with the right password?
    pub fn authorized(&self, header: Option<&str>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some(b64) = header.and_then(|h| h.strip_prefix("Basic ")) else {
            return false;
        };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
            return false;
        };
        let Ok(pair) = String::from_utf8(raw) else {
            return false;
        };
        let Some((user, pass)) = pair.split_once(':') else {
            return false;
        };
        self.users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(pass, hash).unwrap_or(false))
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("tls_server_config.cert_file {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls_server_config.cert_file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_server_config.cert_file {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("tls_server_config.key_file {}: {e}", key.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!("tls_server_config: the certificate and key do not make a server: {e}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("webcfg-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn basic_auth_accepts_the_right_password_only() {
        let d = tmpdir("auth");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let p = write(
            &d,
            "web.yml",
            &format!("basic_auth_users:\n  prom: '{hash}'\n"),
        );
        let w = WebConfig::load(&p).unwrap();
        let header = |u: &str, pw: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{pw}"))
            )
        };
        assert!(w.requires_auth() && w.tls.is_none());
        assert!(w.authorized(Some(&header("prom", "s3cret"))));
        assert!(!w.authorized(Some(&header("prom", "wrong"))));
        assert!(!w.authorized(Some(&header("other", "s3cret"))));
        assert!(!w.authorized(Some("Bearer x")));
        assert!(!w.authorized(Some("Basic !!!")));
        assert!(!w.authorized(None));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn unsupported_fields_and_plain_passwords_are_errors_naming_them() {
        let d = tmpdir("bad");
        let p = write(&d, "a.yml", "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequireAndVerifyClientCert\n");
        let e = WebConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("client_auth_type"), "{e}");
        let p = write(&d, "b.yml", "basic_auth_users:\n  prom: plain\n");
        let e = WebConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("basic_auth_users.prom") && e.contains("bcrypt"),
            "{e}"
        );
        let p = write(
            &d,
            "c.yml",
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
        );
        let e = WebConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("cert_file") && e.contains("missing.crt"), "{e}");
        let e = WebConfig::load(&d.join("absent.yml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.yml"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
