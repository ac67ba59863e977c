//! A throwaway PostgreSQL server for the ledger tests: installed from the distribution's
//! packages when missing, initialised in a temporary folder, run as an unprivileged user on
//! 127.0.0.1 at a free port, and stopped (and removed) when dropped.

use std::path::PathBuf;

use xshell::{Shell, cmd};

use crate::Result;

/// A running server; `url()` is a superuser URL that may create databases.
pub struct Server {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// The self-signed certificate the server offers TLS with (when openssl could make one).
    pub ca: Option<PathBuf>,
    /// `Some(user)` when commands run as that user (we are root).
    run_as: Option<String>,
}

/// The unprivileged user the server runs as when xtask runs as root (initdb refuses root).
const USER: &str = "nobody";

impl Server {
    pub fn start(sh: &Shell) -> Result<Server> {
        let bin = match find_bin() {
            Some(bin) => bin,
            None => {
                install(sh)?;
                find_bin().ok_or("PostgreSQL was installed, but its initdb was not found")?
            }
        };
        let root = cmd!(sh, "id -u").read()?.trim() == "0";
        let run_as = root.then(|| USER.to_owned());
        // A short path under /tmp: the server's socket path has a length limit, `nobody` must
        // be able to enter it, and pg_ctl passes it through a shell (no spaces).
        let dir = PathBuf::from("/tmp").join(format!("nvs-postgres-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if let Some(user) = &run_as {
            cmd!(sh, "chown {user} {dir}").run()?;
        }
        let port = free_port()?;
        let mut server = Server {
            bin,
            dir,
            port,
            ca: None,
            run_as,
        };
        let data = server.dir.join("data");
        server.run(
            sh,
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            server.dir.display()
        );
        // TLS with a self-signed certificate for localhost, so the ledger's sslmode handling is
        // tested against a real server (skipped where openssl cannot make one).
        if let Some(ca) = server.certificate(sh) {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                server.dir.join("server.crt").display(),
                server.dir.join("server.key").display()
            ));
            server.ca = Some(ca);
        }
        let log = server.dir.join("server.log");
        server.run(
            sh,
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        )?;
        eprintln!("postgres: a throwaway server on 127.0.0.1:{port}");
        Ok(server)
    }

    /// A URL for the superuser (trusted on 127.0.0.1), database `postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// A fresh database on the server, as a URL.
    pub fn create_database(&self, sh: &Shell, name: &str) -> Result<String> {
        let psql = self.bin.join("psql");
        let port = self.port.to_string();
        let create = format!("CREATE DATABASE {name}");
        cmd!(
            sh,
            "{psql} -q -h 127.0.0.1 -p {port} -U postgres -d postgres -c {create}"
        )
        .quiet()
        .run()?;
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        ))
    }

    /// A throwaway CA, and a certificate it signs for localhost and 127.0.0.1 (with its key,
    /// private to the server's user): the server's `server.crt`/`server.key`. Returns the CA's
    /// certificate, for clients that verify.
    fn certificate(&self, sh: &Shell) -> Option<PathBuf> {
        let at = |name: &str| self.dir.join(name);
        let (ca, ca_key) = (at("ca.crt"), at("ca.key"));
        let (cert, key, csr, ext) = (
            at("server.crt"),
            at("server.key"),
            at("server.csr"),
            at("server.ext"),
        );
        std::fs::write(
            &ext,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .ok()?;
        let steps = [
            cmd!(
                sh,
                "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=nvs-test-ca
                 -keyout {ca_key} -out {ca}"
            ),
            cmd!(
                sh,
                "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout {key} -out {csr}"
            ),
            cmd!(
                sh,
                "openssl x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -days 2
                 -extfile {ext} -out {cert}"
            ),
            cmd!(sh, "chmod 600 {key}"),
        ];
        for step in steps {
            step.quiet().ignore_stderr().ignore_stdout().run().ok()?;
        }
        if let Some(user) = &self.run_as {
            cmd!(sh, "chown {user} {cert} {key}").quiet().run().ok()?;
        }
        Some(ca)
    }

    fn run(&self, sh: &Shell, tool: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
        let program = self.bin.join(tool);
        match &self.run_as {
            Some(user) => cmd!(sh, "runuser -u {user} -- {program} {args...}")
                .quiet()
                .run()?,
            None => cmd!(sh, "{program} {args...}").quiet().run()?,
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let sh = match Shell::new() {
            Ok(sh) => sh,
            Err(_) => return,
        };
        let data = self.dir.join("data");
        let _ = self.run(
            &sh,
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), else where `initdb` is on
/// the PATH.
fn find_bin() -> Option<PathBuf> {
    debian_bin().or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        })
    })
}

fn debian_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn install(sh: &Shell) -> Result<()> {
    crate::debian::install(sh, "postgresql", "PostgreSQL's server (initdb, pg_ctl)").map_err(|e| {
        format!(
            "{e}; or set NVS_TEST_POSTGRES to a server whose user may create databases and run \
             `cargo test`"
        )
        .into()
    })
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `cargo xtask postgres`: a server for running the ledger tests by hand; prints the variables
/// to set and stops when standard input ends (Ctrl-D). (Ctrl-C leaves it running: stop it with
/// `pg_ctl -D /tmp/nvs-postgres-PID/data stop`.)
pub fn serve(sh: &Shell) -> Result<std::process::ExitCode> {
    let server = Server::start(sh)?;
    println!("export NVS_TEST_POSTGRES='{}'", server.url());
    if let Some(ca) = &server.ca {
        println!("export NVS_TEST_POSTGRES_CA='{}'", ca.display());
    }
    eprintln!("postgres: running; Ctrl-D stops it (Ctrl-C would leave it running)");
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line)? > 0 {
        line.clear();
    }
    drop(server);
    Ok(std::process::ExitCode::SUCCESS)
}
