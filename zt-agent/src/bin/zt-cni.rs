//! `zt-cni`, the CNI plugin: see `zt_agent::cni`. Run by a container runtime (CNI_COMMAND in
//! its environment), or as `zt-cni install BIN-DIR CONF-DIR [SOCKET]` to put itself on a node.

use std::{io::Read as _, path::PathBuf, process::ExitCode};

use zt_agent::cni::{self, Invocation};

const USAGE: &str = "usage: zt-cni install BIN-DIR CONF-DIR [SOCKET] (e.g. /host/opt/cni/bin /host/etc/cni/net.d /run/zt/agent.sock)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(command) = args.first() {
        return match (command.as_str(), &args[1..]) {
            ("install", [bin_dir, conf_dir, rest @ ..]) if rest.len() <= 1 => {
                let socket = rest.first().map_or_else(|| PathBuf::from(zt_agent::control::DEFAULT_SOCKET), PathBuf::from);
                match cni::install(bin_dir.as_ref(), conf_dir.as_ref(), &socket) {
                    Ok(done) => {
                        println!("{done}");
                        ExitCode::SUCCESS
                    }
                    Err(err) => {
                        eprintln!("zt-cni install: {err:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            _ => {
                eprintln!("{USAGE}");
                ExitCode::from(2)
            }
        };
    }
    run_plugin()
}

/// As the runtime runs it: the command in the environment, the configuration on stdin.
fn run_plugin() -> ExitCode {
    let mut config = String::new();
    let invocation = Invocation::from_env();
    let result = std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut config)
        .map_err(anyhow::Error::from)
        .and_then(|_| cni::run(&invocation, &config));
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!("{}", cni::error_result(&err));
            ExitCode::FAILURE
        }
    }
}
