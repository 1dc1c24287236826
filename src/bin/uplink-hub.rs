//! `uplink-hub`: the hub server and its admin CLI. See `uplink::hub`.
#![forbid(unsafe_code)]

fn main() {
    let args: uplink::hub::cli::Args = argh::from_env();
    std::process::exit(uplink::hub::cli::run(args));
}
