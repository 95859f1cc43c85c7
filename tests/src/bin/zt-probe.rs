//! `zt-probe tcp <addr:port> <timeout-ms>`: one TCP echo round trip, exit 0 on success. Tests run
//! it as a separate process where a thread will not do, e.g. inside a cgroup.
use std::{net::SocketAddr, process::ExitCode, time::Duration};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some("tcp"), Some(addr), Some(timeout)) = (args.get(1).map(String::as_str), args.get(2), args.get(3)) else {
        eprintln!("usage: zt-probe tcp <addr:port> <timeout-ms>");
        return ExitCode::from(2);
    };
    let (Ok(addr), Ok(timeout)) = (addr.parse::<SocketAddr>(), timeout.parse::<u64>()) else {
        eprintln!("zt-probe: bad address or timeout");
        return ExitCode::from(2);
    };
    match zt_tests::traffic::tcp_echo_roundtrip(addr, Duration::from_millis(timeout)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("zt-probe: {addr}: {err:#}");
            ExitCode::FAILURE
        }
    }
}
