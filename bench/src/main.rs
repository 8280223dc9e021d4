//! `govshare-bench`: load and benchmark harness for govshare. See `govshare-bench --help`.
#![forbid(unsafe_code)]

use clap::Parser;

/// mimalloc instead of the system allocator: prost, tonic and the broker allocate many small,
/// short-lived buffers per exchange, and glibc's malloc was a fifth of the broker's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = govshare_bench::cli::Cli::parse();
    govshare_bench::init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(govshare_bench::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
