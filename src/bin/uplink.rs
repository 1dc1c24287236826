//! `uplink`: the agent binary. Thin: arguments in, `uplink::agent` out.

use argh::FromArgs;
use std::path::PathBuf;
use uplink::agent::{self, Options, exit};

#[derive(FromArgs)]
/// uplink connects this Kubernetes cluster to an uplink hub over one
/// outbound TLS connection. Start with `uplink run --help`.
struct Cli {
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Run(Run),
    Activate(Activate),
    Status(Status),
    Version(Version),
}

/// Declares a subcommand that takes the agent's flags. `run` and
/// `activate` take the same ones, and argh cannot share fields between
/// structs, so the list is written once here.
macro_rules! agent_flags {
    ($(#[$doc:meta])* $name:ident = $sub:literal, health_addr: $(#[$health:meta])*) => {
        #[derive(FromArgs)]
        #[argh(subcommand, name = $sub)]
        $(#[$doc])*
        struct $name {
            /// activation file, or a directory holding activation.json (a mounted
            /// Secret) [env UPLINK_ACTIVATION; default /etc/uplink/activation.json]
            #[argh(option)]
            activation: Option<PathBuf>,
            /// file to keep the registration in [env UPLINK_STATE; default
            /// /var/lib/uplink/state]
            #[argh(option)]
            state: Option<PathBuf>,
            /// keep the registration in this pre-created Secret instead,
            /// NAMESPACE/NAME, e.g. uplink/uplink-state [env UPLINK_STATE_SECRET]
            #[argh(option)]
            state_secret: Option<String>,
            /// kubeconfig for the API server (e.g. /etc/rancher/k3s/k3s.yaml)
            /// [env UPLINK_KUBECONFIG; default: in-cluster, else k3s.yaml, else
            /// $KUBECONFIG or ~/.kube/config]
            #[argh(option)]
            kubeconfig: Option<PathBuf>,
            /// API server URL, instead of a kubeconfig
            #[argh(option)]
            kube_url: Option<String>,
            /// bearer token file for --kube-url (re-read when it changes)
            #[argh(option)]
            kube_token_file: Option<PathBuf>,
            /// CA bundle (PEM) for --kube-url
            #[argh(option)]
            kube_ca: Option<PathBuf>,
            $(#[$health])*
            #[argh(option)]
            health_addr: Option<String>,
            /// agent configuration file: allowed_users, allowed_groups,
            /// drain_seconds [env UPLINK_CONFIG]
            #[argh(option)]
            config: Option<PathBuf>,
        }

        impl $name {
            fn options(self) -> Result<Options, agent::AgentError> {
                options(
                    self.activation,
                    self.state,
                    self.state_secret,
                    self.kubeconfig,
                    self.kube_url,
                    self.kube_token_file,
                    self.kube_ca,
                    self.health_addr,
                    self.config,
                )
            }
        }
    };
}

agent_flags! {
    /// Run the agent: activate once if needed, then keep the tunnel to the hub
    /// up and serve kubectl requests through it. Stops with status 0 on
    /// SIGTERM, 2 on bad configuration or activation, 4 when the cluster was
    /// deregistered.
    Run = "run",
    health_addr:
    /// where /healthz, /readyz and /metrics listen [env
    /// UPLINK_HEALTH_ADDR; default 127.0.0.1:9464]
}

agent_flags! {
    /// Activate with the hub and save the registration, then exit (0 when
    /// registered, also when it already was). Takes the same flags as `run`.
    Activate = "activate",
    health_addr:
    /// ignored; accepted so `run` and `activate` take the same flags
}

#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
/// Ask the running agent how it is: exit 0 when healthy, 1 when not.
/// Default checks readiness (tunnel up) and prints the metrics.
struct Status {
    /// the agent's health address [env UPLINK_HEALTH_ADDR; default
    /// 127.0.0.1:9464]
    #[argh(option)]
    health_addr: Option<String>,
    /// only check that the process is alive (/healthz)
    #[argh(switch)]
    live: bool,
    /// only check that the tunnel is up (/readyz)
    #[argh(switch)]
    ready: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "version")]
/// Print the version.
struct Version {}

fn env_path(flag: Option<PathBuf>, var: &str) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from))
}

fn env_str(flag: Option<String>, var: &str) -> Option<String> {
    flag.or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()))
}

#[allow(clippy::too_many_arguments)]
fn options(
    activation: Option<PathBuf>,
    state: Option<PathBuf>,
    state_secret: Option<String>,
    kubeconfig: Option<PathBuf>,
    kube_url: Option<String>,
    kube_token_file: Option<PathBuf>,
    kube_ca: Option<PathBuf>,
    health_addr: Option<String>,
    config: Option<PathBuf>,
) -> Result<Options, agent::AgentError> {
    let state_secret = env_str(state_secret, "UPLINK_STATE_SECRET");
    let state_file = env_path(state, "UPLINK_STATE");
    let state = match (state_secret, state_file) {
        (Some(_), Some(_)) => return Err(agent::AgentError::config("give either --state or --state-secret, not both")),
        (Some(spec), None) => agent::state::StateStore::secret(&spec).map_err(agent::AgentError::config)?,
        (None, f) => agent::state::StateStore::File(f.unwrap_or_else(|| agent::DEFAULT_STATE.into())),
    };
    if kube_url.is_none() && (kube_token_file.is_some() || kube_ca.is_some()) {
        return Err(agent::AgentError::config("--kube-token-file and --kube-ca need --kube-url"));
    }
    Ok(Options {
        activation: env_path(activation, "UPLINK_ACTIVATION").unwrap_or_else(|| agent::DEFAULT_ACTIVATION.into()),
        state,
        kube: agent::kube::KubeFlags {
            kubeconfig: env_path(kubeconfig, "UPLINK_KUBECONFIG"),
            url: kube_url,
            token_file: kube_token_file,
            ca: kube_ca,
        },
        health_addr: env_str(health_addr, "UPLINK_HEALTH_ADDR").unwrap_or_else(|| agent::DEFAULT_HEALTH_ADDR.into()),
        config: env_path(config, "UPLINK_CONFIG"),
    })
}

fn status(s: Status) -> i32 {
    let addr = env_str(s.health_addr, "UPLINK_HEALTH_ADDR").unwrap_or_else(|| agent::DEFAULT_HEALTH_ADDR.into());
    let path = if s.live { "/healthz" } else { "/readyz" };
    match agent::health::query(&addr, path) {
        Ok((200, body)) => {
            print!("{body}");
            if !s.live && !s.ready {
                if let Ok((200, metrics)) = agent::health::query(&addr, "/metrics") {
                    metrics.lines().filter(|l| !l.starts_with('#')).for_each(|l| println!("{l}"));
                }
            }
            exit::OK
        }
        Ok((code, body)) => {
            eprintln!("uplink agent at {addr}: {code} {}", body.trim());
            exit::RUNTIME
        }
        Err(e) => {
            eprintln!("uplink agent at {addr} not answering: {e}");
            exit::RUNTIME
        }
    }
}

fn main() {
    let cli: Cli = argh::from_env();
    agent::Logger::init();
    let result = match cli.command {
        Command::Version(_) => {
            println!("uplink {} ({})", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH);
            Ok(())
        }
        Command::Status(s) => std::process::exit(status(s)),
        Command::Run(r) => r.options().and_then(agent::run),
        Command::Activate(a) => a.options().and_then(agent::activate_only),
    };
    if let Err(e) = result {
        log::error!("{e}");
        std::process::exit(e.code);
    }
}
