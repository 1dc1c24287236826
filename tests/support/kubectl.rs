//! Running the real kubectl (1.32) against a stand-in.
//!
//! [`Kubectl::find`] locates it (`UPLINK_KUBECTL`, else
//! `/usr/lib/google-cloud-sdk/bin/kubectl.1.32`). When it is missing, tests
//! print a loud message and skip, unless `UPLINK_REQUIRE_KUBECTL=1` (CI),
//! then they fail.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const DEFAULT_KUBECTL: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32";

/// A kubectl binary plus a private kubeconfig and cache directory.
pub struct Kubectl {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

/// A fresh empty directory under the target's temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("uplink-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl Kubectl {
    /// The kubectl to use, or `None` (after saying so loudly) when it is
    /// missing and not required.
    pub fn find(tag: &str) -> Option<Kubectl> {
        let bin = PathBuf::from(std::env::var("UPLINK_KUBECTL").unwrap_or_else(|_| DEFAULT_KUBECTL.into()));
        if !bin.is_file() {
            let required = std::env::var("UPLINK_REQUIRE_KUBECTL").is_ok_and(|v| v == "1");
            assert!(!required, "kubectl not found at {} and UPLINK_REQUIRE_KUBECTL=1", bin.display());
            eprintln!("\n!!!!! SKIPPING {tag}: kubectl not found at {} (set UPLINK_KUBECTL) !!!!!\n", bin.display());
            return None;
        }
        let dir = temp_dir(tag);
        let kubeconfig = dir.join("kubeconfig");
        Some(Kubectl { bin, dir, kubeconfig })
    }

    /// A command with this kubectl's environment and `args`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.dir.join("cache"))
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .arg("--request-timeout=60s")
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kubectl")
    }

    /// Runs with `stdin` fed in and closed.
    pub fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin).expect("write stdin");
        drop(input);
        child.wait_with_output().expect("kubectl output")
    }

    /// Starts in the background with piped stdout and stderr.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn kubectl")
    }

    pub fn path(&self) -> &Path {
        &self.kubeconfig
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Lines of a child's stdout (`kubectl get -w`, `logs -f`,
/// `port-forward`), as they come.
pub fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line from `rx` that `pred` accepts; panics, listing the
/// lines seen, when none comes within `patience`.
pub fn wait_line(rx: &mpsc::Receiver<String>, patience: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + patience;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return l,
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    panic!("no line with {what} within {patience:?}; saw {seen:#?}");
}

/// The local port of a `kubectl port-forward` whose stdout is `rx`, from
/// its "Forwarding from 127.0.0.1:PORT -> ..." line.
pub fn forwarded_port(rx: &mpsc::Receiver<String>, patience: Duration) -> u16 {
    const PREFIX: &str = "Forwarding from 127.0.0.1:";
    let l = wait_line(rx, patience, "Forwarding from", |l| l.starts_with(PREFIX));
    l[PREFIX.len()..].split(' ').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {l:?}"))
}

/// Kills a background child and returns what it wrote to stderr.
pub fn kill(mut child: Child) -> String {
    let _ = child.kill();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = child.wait();
    err
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
