//! `zt-cni`, the CNI plugin: see `zt_agent::cni`.

use std::{io::Read as _, process::ExitCode};

use zt_agent::cni::{self, Invocation};

fn main() -> ExitCode {
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
