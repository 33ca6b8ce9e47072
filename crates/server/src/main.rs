//! `flowline`: one binary for serving, operating and benchmarking.

mod app;
mod bench;
mod bench_commerce;
mod bench_observe;
mod bench_orders;
mod bench_realtime;
mod bench_search;
mod cli;
mod config;
mod console;
mod demo;
mod flows;
mod http;
mod metrics;
mod order_ports;
mod probe;
mod sagas;
mod telemetry;
mod traces;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the whole cause chain: actionable without a backtrace.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let mut line = chain.first().cloned().unwrap_or_default();
            for c in chain.iter().skip(1) {
                if !line.contains(c.as_str()) {
                    line.push_str(": ");
                    line.push_str(c);
                }
            }
            // Parser messages span lines; the error stays on one.
            let line = line
                .split('\n')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}
