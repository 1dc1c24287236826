//! A throwaway PostgreSQL server for tests: `initdb` + `pg_ctl` in a temp
//! directory, on a free port, as the `postgres` user when we run as root
//! (PostgreSQL refuses to run as root). Stopped (`pg_ctl stop -m
//! immediate`) and removed on drop.
//!
//! [`Postgres::start`] finds the binaries (`UPLINK_PG_BIN`, else the
//! newest `/usr/lib/postgresql/*/bin`). When they are missing or the
//! server does not start, tests print a loud message and skip, unless
//! `UPLINK_REQUIRE_POSTGRES=1` (CI), then they fail.
//!
//! Not here: anything about uplink's schema (the hub makes it).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `postgres` user's password over TCP.
pub const PASSWORD: &str = "uplink-test-pw";

pub struct Postgres {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    /// Whether commands run as `postgres` through `runuser`.
    as_postgres: bool,
    /// More `-c` settings for the server (TLS, once enabled).
    extra: String,
}

fn required() -> bool {
    std::env::var("UPLINK_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

fn skip_or_fail(tag: &str, why: &str) -> Option<Postgres> {
    assert!(!required(), "{tag}: cannot start PostgreSQL ({why}) and UPLINK_REQUIRE_POSTGRES=1");
    eprintln!(
        "\n!!!!! SKIPPING {tag}: cannot start PostgreSQL: {why} (install postgresql or set UPLINK_PG_BIN) !!!!!\n"
    );
    None
}

fn find_bin() -> Option<PathBuf> {
    if let Ok(b) = std::env::var("UPLINK_PG_BIN") {
        return Some(PathBuf::from(b)).filter(|b| b.join("initdb").is_file());
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// A fresh, running server with an empty database `uplink`, or `None`
    /// (loudly) when PostgreSQL is not installed here.
    pub fn start(tag: &str) -> Option<Postgres> {
        let Some(bin) = find_bin() else {
            return skip_or_fail(tag, "no /usr/lib/postgresql/*/bin/initdb");
        };
        let dir = std::env::temp_dir().join(format!(
            "uplink-pg-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let as_postgres = is_root();
        let pg = Postgres { bin, dir, port: free_port(), as_postgres, extra: String::new() };
        if as_postgres {
            let chown = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&pg.dir).status();
            if !chown.is_ok_and(|s| s.success()) {
                return skip_or_fail(tag, "cannot give the data directory to the postgres user");
            }
        }
        let data = pg.data_dir();
        // TCP needs the password (so tests exercise it); the Unix socket,
        // which only `psql` here uses, trusts the postgres user.
        let pwfile = pg.dir.join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if as_postgres {
            let _ = Command::new("chown").args(["postgres:postgres"]).arg(&pwfile).status();
        }
        let pwfile_arg = format!("--pwfile={}", pwfile.display());
        let init = pg.run(
            "initdb",
            &[
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                &pwfile_arg,
                "-U",
                "postgres",
                "--no-sync",
                "-D",
                data.to_str().unwrap(),
            ],
        );
        if !init.status.success() {
            return skip_or_fail(tag, &format!("initdb failed: {}", String::from_utf8_lossy(&init.stderr).trim()));
        }
        let started = pg.start_server();
        if !started.status.success() {
            return skip_or_fail(tag, &format!("pg_ctl start failed: {}", String::from_utf8_lossy(&started.stderr)));
        }
        let created = pg.psql("postgres", "CREATE DATABASE uplink");
        if !created.status.success() {
            return skip_or_fail(tag, &format!("createdb failed: {}", String::from_utf8_lossy(&created.stderr)));
        }
        Some(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs one of PostgreSQL's programs (as `postgres` when root).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(program);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        c.args(args).current_dir(&self.dir).output().unwrap_or_else(|e| panic!("{}: {e}", exe.display()))
    }

    /// (Re)starts the server on its port; `-w` waits until it accepts.
    pub fn start_server(&self) -> Output {
        // pg_stat_statements: tests count the statements the hub runs.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_preload_libraries=pg_stat_statements{}",
            self.port,
            self.dir.display(),
            self.extra
        );
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &["-D", self.data_dir().to_str().unwrap(), "-l", log.to_str().unwrap(), "-o", &opts, "-w", "start"],
        )
    }

    /// Restarts the server with TLS on (`ssl=on`), presenting `cert_pem`
    /// with `key_pem` (PostgreSQL wants the key private to its owner).
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        let (cert, key) = (self.dir.join("server.crt"), self.dir.join("server.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if self.as_postgres {
            let _ = Command::new("chown").args(["postgres:postgres"]).arg(&cert).arg(&key).status();
        }
        self.extra = format!(" -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}", cert.display(), key.display());
        assert!(self.stop_server().status.success());
        let o = self.start_server();
        assert!(o.status.success(), "PostgreSQL with TLS: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Stops the server at once (connections are cut, as in a crash).
    pub fn stop_server(&self) -> Output {
        self.run("pg_ctl", &["-D", self.data_dir().to_str().unwrap(), "-m", "immediate", "-w", "stop"])
    }

    /// Runs SQL through `psql` against `db`; stdout is unaligned tuples.
    pub fn psql(&self, db: &str, sql: &str) -> Output {
        let (port, socket_dir) = (self.port.to_string(), self.dir.display().to_string());
        self.run(
            "psql",
            &["-h", &socket_dir, "-p", &port, "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-Atc", sql],
        )
    }

    /// `psql` running `sql` against `db` in the background (to hold a lock
    /// while the test does something else).
    pub fn psql_spawn(&self, db: &str, sql: &str) -> std::process::Child {
        let (port, socket_dir) = (self.port.to_string(), self.dir.display().to_string());
        let exe = self.bin.join("psql");
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        c.args(["-h", &socket_dir, "-p", &port, "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .current_dir(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `psql`'s answer, which must succeed.
    pub fn query(&self, sql: &str) -> String {
        let o = self.psql("uplink", sql);
        assert!(o.status.success(), "{sql}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Calls since the last `pg_stat_statements_reset()` of the statements
    /// whose text matches the regular expression `pattern` (`~*`), the
    /// extension's own queries left out.
    pub fn statement_calls(&self, pattern: &str) -> u128 {
        self.query(&format!(
            "SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements WHERE query !~* 'pg_stat_statements' AND \
             query ~* '{pattern}'"
        ))
        .parse()
        .unwrap()
    }

    /// The connection string of the `uplink` database, with the password.
    pub fn url(&self) -> String {
        format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/uplink?sslmode=disable", self.port)
    }

    /// The same without the password (for password files).
    pub fn url_without_password(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/uplink?sslmode=disable", self.port)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
