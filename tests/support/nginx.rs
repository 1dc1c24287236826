//! nginx as the hubs' load balancer: the README's `stream` block, taken
//! from README.md as it stands, in front of replicas on loopback.
//!
//! [`Nginx::start`] needs nginx and its stream module (Debian: `nginx`
//! and `libnginx-mod-stream`). When they are missing, tests print a loud
//! message and skip, unless `UPLINK_REQUIRE_NGINX=1` (CI), then they fail.
//! [`Nginx::set_upstreams`] rewrites the `upstream` and reloads, as an
//! operator adding a replica does.
//!
//! Not here: anything about uplink; nginx never looks inside the TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    bin: PathBuf,
    module: PathBuf,
    pub dir: PathBuf,
    conf: PathBuf,
    /// Where people and agents connect: `127.0.0.1:PORT`.
    pub listen: SocketAddr,
    master: Child,
}

/// nginx with its `stream` module, or `None` (loudly; a failure with
/// `UPLINK_REQUIRE_NGINX=1`, as in CI): the binary and the module's path.
pub fn find(tag: &str) -> Option<(PathBuf, PathBuf)> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|p| p.is_file());
    let module = PathBuf::from("/usr/lib/nginx/modules/ngx_stream_module.so");
    match bin {
        Some(bin) if module.is_file() => Some((bin, module)),
        _ => {
            let why = "needs nginx and its stream module (Debian: nginx libnginx-mod-stream)";
            assert!(std::env::var("UPLINK_REQUIRE_NGINX").as_deref() != Ok("1"), "{tag}: {why}");
            eprintln!("\n!!!!! SKIPPING {tag}: {why} !!!!!\n");
            None
        }
    }
}

/// How long the README's block skips a replica that refused a
/// connection (its `fail_timeout`).
pub fn fail_timeout() -> Duration {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme.split("```nginx\n").nth(1).expect("an nginx block");
    let secs = block.split("fail_timeout=").nth(1).and_then(|v| v.split('s').next()).expect("fail_timeout=Ns");
    Duration::from_secs(secs.parse().expect("fail_timeout in whole seconds"))
}

/// The README's block for `upstreams`, listening on `listen`.
fn readme_block(upstreams: &[SocketAddr], listen: SocketAddr) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme.split("```nginx\n").nth(1).and_then(|b| b.split("```").next()).expect("an nginx block");
    // The README's upstream lists hub-1 and hub-2, one line each: the
    // first line's settings serve every replica given.
    let first = block.lines().find(|l| l.contains("server hub-1.example.com:8443")).expect("hub-1's line");
    let servers: Vec<String> =
        upstreams.iter().map(|a| first.replace("hub-1.example.com:8443", &a.to_string())).collect();
    let block: Vec<&str> = block
        .lines()
        .filter(|l| !l.contains("server hub-2.example.com:8443"))
        .map(|l| if l.contains("server hub-1.example.com:8443") { "@SERVERS@" } else { l })
        .collect();
    let block = block.join("\n").replace("@SERVERS@", &servers.join("\n"));
    let block = block.replace("listen 443;", &format!("listen {listen};"));
    assert!(block.contains(&format!("listen {listen};")), "{block}");
    block
}

fn write_conf(conf: &Path, module: &Path, dir: &Path, upstreams: &[SocketAddr], listen: SocketAddr) {
    let d = dir.display();
    let block = readme_block(upstreams, listen);
    let head = format!(
        "load_module {};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n",
        module.display()
    );
    std::fs::write(conf, format!("{head}{block}")).unwrap();
}

impl Nginx {
    /// nginx on `listen` in front of `upstreams`, once it accepts
    /// connections. `None` as [`find`] says. Start the upstreams first:
    /// the check that nginx listens is a connection it passes on, and an
    /// upstream that refuses it is skipped for `fail_timeout` (10 s).
    pub fn start(tag: &str, listen: SocketAddr, upstreams: &[SocketAddr]) -> Option<Nginx> {
        let (bin, module) = find(tag)?;
        let dir = super::kubectl::temp_dir(&format!("nginx-{tag}"));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = dir.join("nginx.conf");
        write_conf(&conf, &module, &dir, upstreams, listen);
        let command = |extra: &[&str]| {
            let mut c = Command::new(&bin);
            c.arg("-p").arg(&dir).arg("-c").arg(&conf).args(extra);
            c
        };
        let t = command(&["-t"]).output().unwrap();
        assert!(t.status.success(), "nginx -t: {}", String::from_utf8_lossy(&t.stderr));
        let master = command(&[]).stderr(Stdio::null()).spawn().unwrap();
        let n = Nginx { bin, module, dir, conf, listen, master };
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(Instant::now() < end, "nginx does not listen: see {}/error.log", n.dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(n)
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-p").arg(&self.dir).arg("-c").arg(&self.conf).args(extra);
        c
    }

    /// Rewrites the upstream and reloads (SIGHUP): new connections go to
    /// `upstreams`; open ones stay where they are.
    pub fn set_upstreams(&self, upstreams: &[SocketAddr]) {
        write_conf(&self.conf, &self.module, &self.dir, upstreams, self.listen);
        let t = self.command(&["-t"]).output().unwrap();
        assert!(t.status.success(), "nginx -t: {}", String::from_utf8_lossy(&t.stderr));
        let hup = Command::new("kill").args(["-HUP", &self.master.id().to_string()]).status().unwrap();
        assert!(hup.success());
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers (a SIGKILL would
    /// leave them holding the port).
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.master.id().to_string()]).status();
        let _ = self.master.wait();
    }
}
